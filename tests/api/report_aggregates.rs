//! ReportService aggregates (GetAccessReport, GetSecuritySummary,
//! GetDashboardMetrics) over the golden fixture `tests/fixtures/reports/
//! events.jsonl`, ingested through the real server, on both backends. Every
//! expected number below is counted by hand from the fixture (its day `d` is
//! the base day B + d, B being UTC midnight three days ago, so day 2 is
//! yesterday and day 3 today); alerts and incidents come from the real
//! detection pipeline (the brute force of day 2) and IncidentService.

use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, DurationRound, NaiveTime, Utc};
use picket::grpc::pb;
use picket::storage::Backend;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::common::{OPERATOR_TOKEN, TestApp, spawn_app, with_key};

const FIXTURE: &str = include_str!("../fixtures/reports/events.jsonl");
/// Rules the fixture's firewall and quota events would trigger: disabled for
/// the tenant so that the alerts are exactly the brute force's.
const QUIET_RULES: [&str; 2] = [
    "8ce09abe-4ada-4fe6-9ce9-d73a81bddbff", // firewall rule changed
    "ec94701f-cb07-4107-bb75-7bbf4c2f0c05", // quota threshold exceeded
];
const BRUTEFORCE_IP: &str = "ae97f06f-3826-4a95-b282-0775102ab7b4";
const BRUTEFORCE_ACTOR: &str = "6978ad3a-1bc2-4834-8b4b-92f09f0ee151";
const SUCCESS_AFTER_BRUTEFORCE: &str = "8ca3c771-c599-43e4-9c7f-a55935e954df";

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    picket::grpc::convert::timestamp(t)
}

fn at(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    let t = t.expect("a timestamp");
    DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
}

/// UTC midnight three days ago: fixture day 0.
fn base_day() -> DateTime<Utc> {
    (Utc::now() - Duration::days(3))
        .duration_trunc(Duration::days(1))
        .unwrap()
}

fn day(d: i64) -> DateTime<Utc> {
    base_day() + Duration::days(d)
}

fn range(start: DateTime<Utc>, end: DateTime<Utc>) -> Option<pb::TimeRange> {
    Some(pb::TimeRange {
        start: Some(ts(start)),
        end: Some(ts(end)),
    })
}

/// The fixture's events, with their times placed on the base day.
fn fixture_events() -> Vec<pb::Event> {
    let base = base_day();
    FIXTURE
        .lines()
        .enumerate()
        .map(|(n, line)| {
            let v: serde_json::Value = serde_json::from_str(line).expect("fixture line");
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            let time = NaiveTime::parse_from_str(&s("time"), "%H:%M:%S%.f").expect("time");
            let when = base + Duration::days(v["day"].as_i64().unwrap()) + (time - NaiveTime::MIN);
            let outcome = match s("outcome").as_str() {
                "success" => pb::Outcome::Success,
                "failure" => pb::Outcome::Failure,
                _ => pb::Outcome::Unknown,
            };
            let severity = match s("severity").as_str() {
                "" | "info" => pb::Severity::Info,
                "low" => pb::Severity::Low,
                "medium" => pb::Severity::Medium,
                "high" => pb::Severity::High,
                "critical" => pb::Severity::Critical,
                other => panic!("severity {other}"),
            };
            pb::Event {
                occurred_at: Some(ts(when)),
                event_type: s("type"),
                idempotency_key: format!("fixture-{n}"),
                actor: s("actor"),
                action: s("action"),
                resource: s("resource"),
                outcome: outcome as i32,
                severity: severity as i32,
                source_ip: s("ip"),
                ..Default::default()
            }
        })
        .collect()
}

fn reports(app: &TestApp) -> pb::report_service_client::ReportServiceClient<Channel> {
    pb::report_service_client::ReportServiceClient::new(app.channel.clone())
}

/// A tenant with the quiet rules disabled and the fixture ingested; its key.
async fn tenant_with_fixture(app: &TestApp, name: &str) -> String {
    // The fixture is back-dated: events sent before detection leads its
    // shards would be skipped by the take-over's replay (it covers the last
    // 24 h of event time), and their alerts never raised.
    app.wait_detecting().await;
    let (tenant, key) = app
        .tenant_with_key(
            name,
            &[pb::Scope::Ingest, pb::Scope::Read, pb::Scope::Respond],
        )
        .await;
    for rule in QUIET_RULES {
        app.admin()
            .set_rule_enabled(with_key(
                pb::SetRuleEnabledRequest {
                    tenant_id: tenant.clone(),
                    rule_id: rule.into(),
                    enabled: false,
                },
                OPERATOR_TOKEN,
            ))
            .await
            .expect("disable rule");
    }
    let events = fixture_events();
    let n = events.len();
    let r = app
        .ingest()
        .ingest(with_key(pb::IngestRequest { events }, &key))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(r.accepted as usize, n, "{:?}", r.receipts);
    key
}

async fn summary(
    app: &TestApp,
    key: &str,
    req: pb::GetSecuritySummaryRequest,
) -> pb::GetSecuritySummaryResponse {
    reports(app)
        .get_security_summary(with_key(req, key))
        .await
        .expect("summary")
        .into_inner()
}

fn summary_of(start: DateTime<Utc>, end: DateTime<Utc>) -> pb::GetSecuritySummaryRequest {
    pb::GetSecuritySummaryRequest {
        time_range: range(start, end),
        ..Default::default()
    }
}

fn daily(containing: Option<DateTime<Utc>>) -> pb::GetSecuritySummaryRequest {
    pb::GetSecuritySummaryRequest {
        period: pb::ReportPeriod::Daily as i32,
        period_containing: containing.map(ts),
        ..Default::default()
    }
}

fn severities(
    info: u64,
    low: u64,
    medium: u64,
    high: u64,
    critical: u64,
) -> Option<pb::SeverityCounts> {
    Some(pb::SeverityCounts {
        info,
        low,
        medium,
        high,
        critical,
    })
}

/// Event figures of fixture days 0 (busy), 1 (quiet) and 2, exact; another
/// tenant with the same events changes nothing.
async fn summary_counts_the_fixture_exactly(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = tenant_with_fixture(&app, "acme").await;
    let _ = tenant_with_fixture(&app, "other").await;
    // From whatever the rollups hold when asked (none, part), then from
    // rollups that hold every event: the same numbers.
    check_summary(&app, &key).await;
    app.wait_rolled_up().await;
    check_summary(&app, &key).await;
}

async fn check_summary(app: &TestApp, key: &str) {
    // Day 0: 18 events. Authentication attempts: the four user.login (the
    // logout is not an attempt), one failed. VPN connects: erin 07:00 and
    // 08:00 and frank 07:45 (frank's failed one is not); new networks: only
    // erin's 203.0.113.0/24 (her 198.51.100.0/24 was used 20 days before;
    // 203.0.113.1 40 days before is too old; frank's has no IP).
    let s = summary(app, key, daily(Some(day(0) + Duration::hours(12)))).await;
    assert_eq!(s.time_range, range(day(0), day(1)));
    assert_eq!(s.events_total, 18);
    assert_eq!(s.auth_attempts, 4);
    assert_eq!(s.failed_logins, 1);
    assert_eq!(s.vpn_connections, 3);
    assert_eq!(s.new_vpn_connections, 1);
    assert_eq!(s.firewall_rule_changes, 2);
    assert_eq!(s.quota_violations, 1);
    // Alerts and incidents are placed by when Picket created them (now).
    assert_eq!(s.alerts_total, 0);
    assert_eq!(s.alerts_by_severity, severities(0, 0, 0, 0, 0));
    assert_eq!(s.incidents_opened, 0);

    // Day 1 is quiet: a report of zeros, not an error or a missing report.
    let quiet = summary(app, key, daily(Some(day(1)))).await;
    assert_eq!(
        quiet,
        pb::GetSecuritySummaryResponse {
            time_range: range(day(1), day(2)),
            alerts_by_severity: severities(0, 0, 0, 0, 0),
            time_to_acknowledge: Some(pb::ResponseTime::default()),
            time_to_investigate: Some(pb::ResponseTime::default()),
            time_to_resolve: Some(pb::ResponseTime::default()),
            ..Default::default()
        }
    );

    // Day 2 (yesterday: the default daily period): 7 mallory logins (6
    // failed), grace's two connects from one IPv6 /48 (the first is new).
    // The login exactly at day 3 00:00 is outside.
    let y = summary(app, key, daily(None)).await;
    assert_eq!(y.time_range, range(day(2), day(3)));
    assert_eq!(
        (y.events_total, y.auth_attempts, y.failed_logins),
        (9, 7, 6)
    );
    assert_eq!((y.vpn_connections, y.new_vpn_connections), (2, 1));
    // Edges: [day 0 00:00, day 0 01:00) holds the login at 00:00:00 and the
    // one at 00:59:59.999999, not the one at 01:00:00.
    let edge = summary(app, key, summary_of(day(0), day(0) + Duration::hours(1))).await;
    assert_eq!(
        (edge.events_total, edge.auth_attempts, edge.failed_logins),
        (2, 2, 1)
    );
    // Weekly and monthly periods resolve to UTC calendar ranges.
    let w = summary(
        app,
        key,
        pb::GetSecuritySummaryRequest {
            period: pb::ReportPeriod::Weekly as i32,
            period_containing: Some(ts(day(0))),
            ..Default::default()
        },
    )
    .await;
    let wr = w.time_range.unwrap();
    let (ws, we) = (at(&wr.start), at(&wr.end));
    assert_eq!(
        ws.format("%u %H:%M:%S").to_string(),
        "1 00:00:00",
        "a Monday"
    );
    assert_eq!(we - ws, Duration::days(7));
    assert!(ws <= day(0) && day(0) < we);
}

/// The access report on day 0, both groupings, filters and pagination.
async fn access_report_groups_filters_and_pages(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = tenant_with_fixture(&app, "acme").await;
    let other = tenant_with_fixture(&app, "other").await;
    let request = |group_by: pb::AccessGrouping, page_size: u32, page_token: String| {
        pb::GetAccessReportRequest {
            period: pb::ReportPeriod::Daily as i32,
            period_containing: Some(ts(day(0))),
            group_by: group_by as i32,
            page_size,
            page_token,
            ..Default::default()
        }
    };
    let mut rows = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = reports(&app)
            .get_access_report(with_key(
                request(pb::AccessGrouping::ActorResourceAction, 5, token),
                &key,
            ))
            .await
            .expect("access report")
            .into_inner();
        assert_eq!(page.time_range, range(day(0), day(1)));
        pages += 1;
        rows.extend(page.rows);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3, "14 groups in pages of 5, 5 and 4");
    let keys: Vec<(String, String, String, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.actor.clone(),
                r.resource.clone(),
                r.action.clone(),
                r.count,
                r.failures,
            )
        })
        .collect();
    let k = |a: &str, r: &str, x: &str, n: u64, f: u64| (a.into(), r.into(), x.into(), n, f);
    assert_eq!(
        keys,
        vec![
            k("alice", "/app", "login", 4, 1),
            k("alice", "/app", "logout", 1, 0),
            k("bob", "/api", "exceeded", 1, 1),
            k("bob", "/api", "report", 1, 0),
            k("bob", "/api/orders", "read", 1, 0),
            k("bob", "/api/orders", "write", 1, 1),
            k("bob", "/api/users", "read", 1, 0),
            k("carol", "/admin/users", "GET", 1, 0),
            k("dave", "fw/policy-1", "update", 1, 0),
            k("dave", "fw/rule-1", "update", 1, 0),
            k("erin", "vpn/gw1", "connect", 1, 0),
            k("erin", "vpn/gw2", "connect", 1, 0),
            k("erin", "vpn/gw2", "disconnect", 1, 0),
            k("frank", "vpn/gw1", "connect", 2, 1),
        ]
    );
    let alice = &rows[0];
    assert_eq!(at(&alice.first_seen), day(0));
    assert_eq!(
        at(&alice.last_seen),
        day(1) - Duration::microseconds(1),
        "the login at 23:59:59.999999 is the last of the day"
    );
    assert_eq!(
        (alice.distinct_resources, alice.distinct_source_ips),
        (1, 2)
    );
    assert_eq!(alice.source_ip, "");
    assert_eq!(rows[13].distinct_source_ips, 1, "frank's success had no IP");

    // Per (actor, source IP): events without an IP form the "" row.
    let by_ip = reports(&app)
        .get_access_report(with_key(
            request(pb::AccessGrouping::ActorSourceIp, 0, String::new()),
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(by_ip.next_page_token.is_empty());
    let got: Vec<(String, String, u64, u64, u64)> = by_ip
        .rows
        .iter()
        .map(|r| {
            (
                r.actor.clone(),
                r.source_ip.clone(),
                r.count,
                r.failures,
                r.distinct_resources,
            )
        })
        .collect();
    let k = |a: &str, ip: &str, n: u64, f: u64, res: u64| (a.into(), ip.into(), n, f, res);
    assert_eq!(
        got,
        vec![
            k("alice", "10.0.0.1", 3, 1, 1),
            k("alice", "10.0.0.2", 2, 0, 1),
            k("bob", "10.0.0.3", 5, 2, 3),
            k("carol", "192.0.2.10", 1, 0, 1),
            k("dave", "10.0.0.4", 2, 0, 2),
            k("erin", "198.51.100.7", 1, 0, 1),
            k("erin", "203.0.113.9", 2, 0, 1),
            k("frank", "", 1, 0, 1),
            k("frank", "198.51.100.20", 1, 1, 1),
        ]
    );
    assert!(
        by_ip
            .rows
            .iter()
            .all(|r| r.resource.is_empty() && r.action.is_empty())
    );

    // Filters: actor, event types, resource prefix.
    let filtered = reports(&app)
        .get_access_report(with_key(
            pb::GetAccessReportRequest {
                actor: "bob".into(),
                event_types: vec!["api.call".into()],
                resource_prefix: "/api/".into(),
                ..request(pb::AccessGrouping::Unspecified, 0, String::new())
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, &str)> = filtered
        .rows
        .iter()
        .map(|r| (r.resource.as_str(), r.action.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/api/orders", "read"),
            ("/api/orders", "write"),
            ("/api/users", "read")
        ]
    );

    // A page token is bound to its request and tenant.
    let first = reports(&app)
        .get_access_report(with_key(
            request(pb::AccessGrouping::ActorResourceAction, 5, String::new()),
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    let err = reports(&app)
        .get_access_report(with_key(
            pb::GetAccessReportRequest {
                actor: "bob".into(),
                ..request(
                    pb::AccessGrouping::ActorResourceAction,
                    5,
                    first.next_page_token.clone(),
                )
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "page_token");
    let err = reports(&app)
        .get_access_report(with_key(
            request(
                pb::AccessGrouping::ActorResourceAction,
                5,
                first.next_page_token,
            ),
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "page_token", "another tenant's token");
}

/// Dashboard series on day 0 in hourly buckets, edges and VPN sessions.
async fn dashboard_buckets_the_fixture_exactly(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = tenant_with_fixture(&app, "acme").await;
    let _ = tenant_with_fixture(&app, "other").await;
    check_dashboard(&app, &key).await;
    app.wait_rolled_up().await;
    check_dashboard(&app, &key).await;
}

async fn check_dashboard(app: &TestApp, key: &str) {
    let m = reports(app)
        .get_dashboard_metrics(with_key(
            pb::GetDashboardMetricsRequest {
                period: pb::ReportPeriod::Daily as i32,
                period_containing: Some(ts(day(0))),
                bucket_seconds: 3600,
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("dashboard")
        .into_inner();
    assert_eq!(m.bucket_seconds, 3600);
    assert_eq!(m.buckets.len(), 24);
    for (i, b) in m.buckets.iter().enumerate() {
        assert_eq!(at(&b.start), day(0) + Duration::hours(i as i64));
        assert_eq!(at(&b.end), day(0) + Duration::hours(i as i64 + 1));
    }
    let events: Vec<u64> = m.buckets.iter().map(|b| b.events).collect();
    let mut want = vec![0u64; 24];
    for (h, n) in [
        (0, 2),
        (1, 1),
        (2, 1),
        (3, 3),
        (4, 1),
        (5, 2),
        (6, 2),
        (7, 3),
        (8, 1),
        (9, 1),
        (23, 1),
    ] {
        want[h] = n;
    }
    assert_eq!(events, want);
    let b = &m.buckets;
    // 00:00:00 and 00:59:59.999999 in bucket 0, 01:00:00 in bucket 1.
    assert_eq!(
        (b[0].auth_attempts, b[0].auth_successes, b[0].failed_logins),
        (2, 1, 1)
    );
    assert_eq!(b[0].auth_success_rate, 0.5);
    assert_eq!((b[1].auth_attempts, b[1].auth_success_rate), (1, 1.0));
    assert_eq!(
        (b[2].auth_attempts, b[2].auth_success_rate),
        (0, 0.0),
        "a logout"
    );
    assert_eq!(b[3].events_by_severity, severities(2, 1, 0, 0, 0));
    assert_eq!(b[5].events_by_severity, severities(0, 0, 2, 0, 0));
    assert_eq!(b[6].events_by_severity, severities(1, 0, 0, 1, 0));
    assert_eq!(b[23].events_by_severity, severities(0, 0, 0, 0, 1));
    let api: Vec<u64> = b.iter().map(|b| b.api_calls).filter(|n| *n > 0).collect();
    assert_eq!(api, vec![3, 1, 2]);
    assert_eq!(b[5].firewall_rule_changes, 2);
    assert_eq!(
        (b[7].vpn_connects, b[8].vpn_connects, b[9].vpn_disconnects),
        (2, 1, 1)
    );
    // Open VPN connections: erin 1 → 2 → 1, frank 1 from 07:45 on.
    let active: Vec<u64> = b.iter().map(|b| b.active_vpn_connections).collect();
    let mut want = vec![0u64; 24];
    for (h, w) in want.iter_mut().enumerate().skip(7) {
        *w = match h {
            7 => 2,
            8 => 3,
            _ => 2,
        };
    }
    assert_eq!(active, want);
    assert!(b.iter().all(|b| b.alerts == 0 && b.incidents == 0));

    // A range that is not a whole number of buckets ends with a short one;
    // the login exactly at the range end (day 3 00:00) is not counted.
    let short = reports(app)
        .get_dashboard_metrics(with_key(
            pb::GetDashboardMetricsRequest {
                time_range: range(day(3) - Duration::minutes(90), day(3)),
                bucket_seconds: 3600,
                ..Default::default()
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(short.buckets.len(), 2);
    assert_eq!(at(&short.buckets[1].end), day(3));
    assert_eq!(at(&short.buckets[1].start), day(3) - Duration::minutes(30));
    assert!(short.buckets.iter().all(|b| b.events == 0));
}

/// Waits (with a deadline) until the tenant has `n` alerts, each grouped
/// into an incident; detection raises them asynchronously.
async fn alerts_when_settled(app: &TestApp, key: &str, n: usize) -> Vec<pb::Alert> {
    let deadline = Instant::now() + StdDuration::from_secs(30);
    loop {
        let alerts = pb::alert_service_client::AlertServiceClient::new(app.channel.clone())
            .list_alerts(with_key(
                pb::ListAlertsRequest {
                    page_size: 100,
                    ..Default::default()
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner()
            .alerts;
        if alerts.len() == n && alerts.iter().all(|a| !a.incident_id.is_empty()) {
            return alerts;
        }
        assert!(
            alerts.len() <= n && Instant::now() < deadline,
            "expected {n} alerts, have {alerts:#?}"
        );
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
}

/// Alerts and incidents from the real pipeline and IncidentService: counts
/// by severity (by level, never by position) and rule, top entities,
/// response times from the status timeline, unresolved critical alerts.
async fn alerts_and_incidents_are_summarized(backend: Backend) {
    let app = spawn_app(backend).await;
    let started = Utc::now();
    let key = tenant_with_fixture(&app, "acme").await;
    let other = tenant_with_fixture(&app, "other").await;
    // Day 2's brute force: 6 failures then a success from one IP in 90 s.
    let alerts = alerts_when_settled(&app, &key, 3).await;
    alerts_when_settled(&app, &other, 3).await;
    let mut rules: Vec<(&str, i32)> = alerts
        .iter()
        .map(|a| (a.source_name.as_str(), a.severity))
        .collect();
    rules.sort();
    assert_eq!(
        rules,
        vec![
            (BRUTEFORCE_ACTOR, pb::Severity::High as i32),
            (SUCCESS_AFTER_BRUTEFORCE, pb::Severity::Critical as i32),
            (BRUTEFORCE_IP, pb::Severity::High as i32),
        ]
    );
    let incidents = pb::incident_service_client::IncidentServiceClient::new(app.channel.clone());
    let mut inc_ids: Vec<String> = alerts.iter().map(|a| a.incident_id.clone()).collect();
    inc_ids.sort();
    inc_ids.dedup();
    // One more incident by hand, left open.
    let manual = incidents
        .clone()
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: "manual".into(),
                description: "left open".into(),
                severity: pb::Severity::Low as i32,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    // The brute force's incident: investigating, then resolved.
    let target = inc_ids[0].clone();
    for status in [
        pb::IncidentStatus::Investigating,
        pb::IncidentStatus::Resolved,
    ] {
        incidents
            .clone()
            .update_incident(with_key(
                pb::UpdateIncidentRequest {
                    incident_id: target.clone(),
                    update_mask: vec!["status".into()],
                    status: status as i32,
                    ..Default::default()
                },
                &key,
            ))
            .await
            .unwrap();
    }
    let detail = incidents
        .clone()
        .get_incident(with_key(
            pb::GetIncidentRequest {
                incident_id: target.clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    let inc = detail.incident.unwrap();
    let created = at(&inc.created_at);
    let changes: Vec<DateTime<Utc>> = detail
        .timeline
        .iter()
        .filter(|e| e.kind == pb::TimelineEntryKind::StatusChanged as i32)
        .map(|e| at(&e.at))
        .collect();
    assert_eq!(changes.len(), 2);
    let secs = |a: DateTime<Utc>, b: DateTime<Utc>| {
        let a = a.duration_trunc(Duration::microseconds(1)).unwrap();
        let b = b.duration_trunc(Duration::microseconds(1)).unwrap();
        (b - a).num_microseconds().unwrap() as f64 / 1e6
    };
    // The critical alert is resolved by hand.
    let critical = alerts
        .iter()
        .find(|a| a.severity == pb::Severity::Critical as i32)
        .unwrap();
    let resolved = pb::alert_service_client::AlertServiceClient::new(app.channel.clone())
        .update_alert(with_key(
            pb::UpdateAlertRequest {
                alert_id: critical.id.clone(),
                status: pb::AlertStatus::Resolved as i32,
                note: "handled".into(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .alert
        .unwrap();
    let resolved_at = at(&resolved.history.last().unwrap().changed_at);

    let hour = started.duration_trunc(Duration::hours(1)).unwrap();
    let (start, end) = (hour - Duration::hours(1), hour + Duration::hours(2));
    let s = summary(&app, &key, summary_of(start, end)).await;
    assert_eq!(s.alerts_total, 3, "another tenant's alerts are not counted");
    assert_eq!(s.alerts_by_severity, severities(0, 0, 0, 2, 1));
    let by_rule: Vec<(&str, u64)> = s
        .alerts_by_rule
        .iter()
        .map(|r| (r.source_name.as_str(), r.count))
        .collect();
    assert_eq!(
        by_rule,
        vec![
            (BRUTEFORCE_ACTOR, 1),
            (SUCCESS_AFTER_BRUTEFORCE, 1),
            (BRUTEFORCE_IP, 1)
        ]
    );
    assert!(s.alerts_by_rule.iter().all(|r| !r.title.is_empty()));
    // Top entities, counted from the alerts themselves.
    // Ties are ordered by the kind's name, then the value.
    let name = |k: i32| pb::EntityKind::try_from(k).unwrap().as_str_name();
    let mut want: std::collections::BTreeMap<(i32, String), u64> = Default::default();
    for a in &alerts {
        for e in &a.entities {
            *want.entry((e.kind, e.value.clone())).or_default() += 1;
        }
    }
    let mut want: Vec<((i32, String), u64)> = want.into_iter().collect();
    want.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(name(a.0.0).cmp(name(b.0.0)))
            .then(a.0.1.cmp(&b.0.1))
    });
    want.truncate(10);
    let got: Vec<((i32, String), u64)> = s
        .top_entities
        .iter()
        .map(|e| {
            let ent = e.entity.clone().unwrap();
            ((ent.kind, ent.value), e.alert_count)
        })
        .collect();
    assert_eq!(got, want);
    assert!(got.iter().any(|((_, v), _)| v == "mallory"));
    assert_eq!(s.incidents_opened, inc_ids.len() as u64 + 1);
    assert_eq!(s.incidents_resolved, 1);
    assert_eq!(
        s.incidents_open,
        inc_ids.len() as u64,
        "the manual one and the others"
    );
    let tta = s.time_to_acknowledge.unwrap();
    let tti = s.time_to_investigate.unwrap();
    let ttr = s.time_to_resolve.unwrap();
    assert_eq!(tta.incidents, 1);
    assert!(
        (tta.mean_seconds - secs(created, changes[0])).abs() < 1e-6,
        "{tta:?}"
    );
    assert_eq!(tti.incidents, 1);
    assert!(
        (tti.mean_seconds - secs(changes[0], changes[1])).abs() < 1e-6,
        "{tti:?}"
    );
    assert_eq!(ttr.incidents, 1);
    assert!(
        (ttr.mean_seconds - secs(created, changes[1])).abs() < 1e-6,
        "{ttr:?}"
    );
    // Stored times have microsecond precision: a range ending at the
    // resolution's microsecond ends just before it (half-open), and one a
    // microsecond later holds it.
    let resolution = changes[1]
        .duration_trunc(Duration::microseconds(1))
        .unwrap();
    let before = summary(&app, &key, summary_of(start, resolution)).await;
    assert_eq!(
        (before.incidents_resolved, before.incidents_open),
        (0, inc_ids.len() as u64 + 1),
        "the incident is still open just before its resolution"
    );
    assert_eq!(
        (
            before.time_to_resolve.unwrap().incidents,
            before.time_to_investigate.unwrap().incidents
        ),
        (0, 0)
    );
    assert_eq!(before.time_to_acknowledge.unwrap().incidents, 1);
    let with = summary(
        &app,
        &key,
        summary_of(start, resolution + Duration::microseconds(1)),
    )
    .await;
    assert_eq!(
        (with.incidents_resolved, with.incidents_open),
        (1, inc_ids.len() as u64)
    );
    // Incidents of a range after their resolution: none opened, none open,
    // nothing acknowledged or resolved in it.
    let after = summary(&app, &key, summary_of(end, end + Duration::hours(1))).await;
    assert_eq!(
        (
            after.incidents_opened,
            after.incidents_resolved,
            after.incidents_open
        ),
        (0, 0, inc_ids.len() as u64)
    );
    assert_eq!(manual.status, pb::IncidentStatus::Open as i32);

    // Dashboard: each alert in the minute bucket of its creation, by level.
    let m = reports(&app)
        .get_dashboard_metrics(with_key(
            pb::GetDashboardMetricsRequest {
                time_range: range(start, end),
                bucket_seconds: 60,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.buckets.len(), 180);
    let bucket_of = |t: DateTime<Utc>| ((t - start).num_seconds() / 60) as usize;
    let mut want_high = vec![0u64; 180];
    let mut want_critical = vec![0u64; 180];
    for a in &alerts {
        let i = bucket_of(at(&a.created_at));
        if a.severity == pb::Severity::Critical as i32 {
            want_critical[i] += 1;
        } else {
            want_high[i] += 1;
        }
    }
    let sev = |b: &pb::MetricsBucket| b.alerts_by_severity.unwrap();
    assert_eq!(
        m.buckets.iter().map(|b| sev(b).high).collect::<Vec<_>>(),
        want_high
    );
    assert_eq!(
        m.buckets
            .iter()
            .map(|b| sev(b).critical)
            .collect::<Vec<_>>(),
        want_critical
    );
    assert!(
        m.buckets
            .iter()
            .all(|b| sev(b).info + sev(b).low + sev(b).medium == 0)
    );
    assert_eq!(m.buckets.iter().map(|b| b.alerts).sum::<u64>(), 3);
    assert_eq!(
        m.buckets.iter().map(|b| b.incidents).sum::<u64>(),
        inc_ids.len() as u64 + 1
    );
    let low: u64 = m
        .buckets
        .iter()
        .map(|b| b.incidents_by_severity.unwrap().low)
        .sum();
    assert_eq!(low, 1, "the manual incident");
    // The critical alert is unresolved from its creation to its resolution.
    let crit_created = at(&critical.created_at);
    for b in &m.buckets {
        let end = at(&b.end);
        let want = u64::from(crit_created < end && resolved_at >= end);
        assert_eq!(b.unresolved_critical_alerts, want, "bucket ending {end}");
    }
}

/// `picket report …` as a child process: JSON and table output, the same
/// numbers as the RPCs.
async fn cli_prints_reports(backend: Backend) {
    let app = spawn_app(backend).await;
    let key = tenant_with_fixture(&app, "acme").await;
    let addr = format!("http://{}", app.addr);
    let run = async |args: &[&str]| {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .arg("report")
            .args(args)
            .env("PICKET_SERVER", &addr)
            .env("PICKET_API_KEY", &key)
            .output()
            .await
            .expect("run picket");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let day0 = day(0).to_rfc3339();
    let json: serde_json::Value = serde_json::from_str(
        &run(&["summary", "--period", "daily", "--at", &day0, "--json"]).await,
    )
    .unwrap();
    assert_eq!(json["events_total"], 18);
    assert_eq!(json["new_vpn_connections"], 1);
    assert_eq!(json["alerts_by_severity"]["critical"], 0);
    let table = run(&["summary", "--period", "daily", "--at", &day0]).await;
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["auth_attempts", "4"]),
        "{table}"
    );
    let (from, to) = (day(0).to_rfc3339(), day(1).to_rfc3339());
    let access: serde_json::Value = serde_json::from_str(
        &run(&[
            "access",
            "--from",
            &from,
            "--to",
            &to,
            "--by-source-ip",
            "--json",
        ])
        .await,
    )
    .unwrap();
    let rows = access["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 9);
    assert_eq!(rows[2]["actor"], "bob");
    assert_eq!(rows[2]["source_ip"], "10.0.0.3");
    assert_eq!(rows[2]["count"], 5);
    let table = run(&["access", "--from", &from, "--to", &to]).await;
    assert_eq!(
        table.lines().count(),
        2 + 14,
        "a title, a header and 14 rows:\n{table}"
    );
    let dash: serde_json::Value = serde_json::from_str(
        &run(&["dashboard", "--period", "daily", "--at", &day0, "--json"]).await,
    )
    .unwrap();
    let buckets = dash["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 24);
    assert_eq!(buckets[8]["active_vpn_connections"], 3);
    assert_eq!(buckets[0]["auth_success_rate"], 0.5);
}

fn field(status: &tonic::Status) -> String {
    status
        .get_details_bad_request()
        .expect("a BadRequest")
        .field_violations[0]
        .field
        .clone()
}

/// Bad input names its field; a key without `read` is refused.
async fn reports_refuse_bad_input(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("acme", &[pb::Scope::Read]).await;
    let (_, ingest_only) = app.tenant_with_key("writer", &[pb::Scope::Ingest]).await;
    let mut c = reports(&app);
    let t0 = day(0);
    let cases: Vec<(pb::GetSecuritySummaryRequest, &str)> = vec![
        (pb::GetSecuritySummaryRequest::default(), "time_range.start"),
        (
            pb::GetSecuritySummaryRequest {
                time_range: Some(pb::TimeRange {
                    start: Some(ts(t0)),
                    end: None,
                }),
                ..Default::default()
            },
            "time_range.end",
        ),
        (summary_of(t0, t0), "time_range.end"),
        (summary_of(t0, t0 + Duration::days(367)), "time_range.end"),
        (
            pb::GetSecuritySummaryRequest {
                period: pb::ReportPeriod::Daily as i32,
                ..summary_of(t0, t0 + Duration::days(1))
            },
            "time_range",
        ),
        (
            pb::GetSecuritySummaryRequest {
                period: 9,
                ..Default::default()
            },
            "period",
        ),
        (
            pb::GetSecuritySummaryRequest {
                period_containing: Some(ts(t0)),
                ..summary_of(t0, t0 + Duration::days(1))
            },
            "period_containing",
        ),
    ];
    for (req, want) in cases {
        let err = c
            .get_security_summary(with_key(req, &key))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert_eq!(field(&err), want, "{req:?}");
    }
    let dash = |bucket_seconds: u32, days: i64| pb::GetDashboardMetricsRequest {
        time_range: range(t0, t0 + Duration::days(days)),
        bucket_seconds,
        ..Default::default()
    };
    for (req, want) in [
        (dash(59, 1), "bucket_seconds"),
        (dash(700_000, 1), "bucket_seconds"),
        (dash(60, 1), "bucket_seconds"), // 1,440 buckets
        (dash(3600, 367), "time_range.end"),
    ] {
        let err = c
            .get_dashboard_metrics(with_key(req, &key))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field(&err)),
            (Code::InvalidArgument, want.to_owned())
        );
    }
    let access = |f: &dyn Fn(&mut pb::GetAccessReportRequest)| {
        let mut r = pb::GetAccessReportRequest {
            time_range: range(t0, t0 + Duration::days(1)),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (req, want) in [
        (access(&|r| r.page_size = 1001), "page_size"),
        (access(&|r| r.page_token = "garbage".into()), "page_token"),
        (
            access(&|r| r.event_types = vec!["Bad Type".into()]),
            "event_types[0]",
        ),
        (access(&|r| r.actor = "a".repeat(1025)), "actor"),
        (
            access(&|r| r.resource_prefix = "r".repeat(1025)),
            "resource_prefix",
        ),
        (access(&|r| r.group_by = 7), "group_by"),
        (access(&|r| r.time_range = None), "time_range.start"),
    ] {
        let err = c.get_access_report(with_key(req, &key)).await.unwrap_err();
        assert_eq!(
            (err.code(), field(&err)),
            (Code::InvalidArgument, want.to_owned())
        );
    }
    let err = c
        .get_security_summary(with_key(daily(None), &ingest_only))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c.get_security_summary(daily(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

crate::both_backends!(
    summary_counts_the_fixture_exactly,
    access_report_groups_filters_and_pages,
    dashboard_buckets_the_fixture_exactly,
    alerts_and_incidents_are_summarized,
    reports_refuse_bad_input,
    cli_prints_reports,
);
