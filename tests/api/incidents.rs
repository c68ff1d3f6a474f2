//! Incidents: correlation of alerts, timeline, status machine, reopen, merge,
//! and resumable watch streams (across a disconnect and a server restart).

use picket::grpc::pb;
use picket::storage::Backend;
use tonic::Code;

use crate::common::{self, TestApp, with_key};
use crate::ingest::login;

type Client = pb::incident_service_client::IncidentServiceClient<tonic::transport::Channel>;

fn incidents(app: &TestApp) -> Client {
    pb::incident_service_client::IncidentServiceClient::new(app.channel.clone())
}

async fn burst(app: &TestApp, key: &str, tag: &str, ip: &str, actor: &str) {
    let events = (0..7)
        .map(|i| login(&format!("{tag}-{i}"), actor, ip, false))
        .collect();
    app.ingest()
        .ingest(with_key(pb::IngestRequest { events }, key))
        .await
        .unwrap();
}

/// Longest wait for one change: a missing change fails the test, never hangs it.
const CHANGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Next change on an incidents watch (skipping heartbeats and the snapshot marker).
async fn next_change(
    s: &mut tonic::Streaming<pb::WatchIncidentsResponse>,
) -> (pb::IncidentChange, String) {
    tokio::time::timeout(CHANGE_DEADLINE, async {
        loop {
            let item = s.message().await.unwrap().expect("stream ended");
            if let Some(pb::watch_incidents_response::Item::Change(c)) = item.item {
                return (c, item.cursor);
            }
        }
    })
    .await
    .expect("no change arrived")
}

async fn next_one(
    s: &mut tonic::Streaming<pb::WatchIncidentResponse>,
) -> (pb::IncidentChange, String) {
    tokio::time::timeout(CHANGE_DEADLINE, async {
        loop {
            let item = s.message().await.unwrap().expect("stream ended");
            if let Some(pb::watch_incident_response::Item::Change(c)) = item.item {
                return (c, item.cursor);
            }
        }
    })
    .await
    .expect("no change arrived")
}

async fn watch_all(app: &TestApp, key: &str) -> tonic::Streaming<pb::WatchIncidentsResponse> {
    incidents(app)
        .watch_incidents(with_key(
            pb::WatchIncidentsRequest {
                filter: None,
                options: Some(pb::WatchOptions {
                    after_cursor: String::new(),
                    heartbeat_interval_seconds: 1,
                }),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
}

fn update(id: &str, mask: &[&str], status: pb::IncidentStatus) -> pb::UpdateIncidentRequest {
    pb::UpdateIncidentRequest {
        incident_id: id.into(),
        update_mask: mask.iter().map(|s| s.to_string()).collect(),
        status: status as i32,
        severity: pb::Severity::Critical as i32,
        assignee: "oncall@example.com".into(),
        tags: vec!["bruteforce".into()],
    }
}

async fn alerts_correlate_into_incidents_with_a_timeline(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key(
            "acme",
            &[pb::Scope::Ingest, pb::Scope::Read, pb::Scope::Respond],
        )
        .await;
    let mut all = watch_all(&app, &key).await;
    // The snapshot of an empty tenant is just the marker.
    let first = all.message().await.unwrap().unwrap();
    assert!(matches!(
        first.item,
        Some(pb::watch_incidents_response::Item::SnapshotComplete(
            pb::SnapshotComplete { item_count: 0 }
        ))
    ));

    burst(&app, &key, "b1", "203.0.113.50", "alice").await;
    let (created, _) = next_change(&mut all).await;
    assert_eq!(created.kind, pb::IncidentChangeKind::Created as i32);
    let inc = created.incident.unwrap();
    assert!(
        inc.entities
            .iter()
            .any(|e| e.value == "203.0.113.50" || e.value == "alice")
    );
    // The per-IP and per-account burst alerts land in the same incident.
    let full = loop {
        let got = incidents(&app)
            .get_incident(with_key(
                pb::GetIncidentRequest {
                    incident_id: inc.id.clone(),
                },
                &key,
            ))
            .await
            .unwrap()
            .into_inner();
        if got.alerts.len() >= 2 {
            break got;
        }
        next_change(&mut all).await;
    };
    assert!(full.alerts.iter().all(|a| a.incident_id == inc.id));
    assert!(
        full.timeline
            .iter()
            .any(|t| t.kind == pb::TimelineEntryKind::Created as i32)
    );
    assert!(
        full.timeline
            .iter()
            .filter(|t| t.kind == pb::TimelineEntryKind::AlertLinked as i32)
            .count()
            >= 2
    );
    let severity = full.alerts.iter().map(|a| a.severity).max().unwrap();
    assert_eq!(
        full.incident.as_ref().unwrap().severity,
        severity,
        "incident severity is the highest of its alerts"
    );

    // Status moves forward only; each change is on the timeline with who did it.
    let up = incidents(&app)
        .update_incident(with_key(
            update(
                &inc.id,
                &["status", "assignee", "tags"],
                pb::IncidentStatus::Investigating,
            ),
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    assert_eq!(up.status, pb::IncidentStatus::Investigating as i32);
    assert_eq!(up.assignee, "oncall@example.com");
    let err = incidents(&app)
        .update_incident(with_key(
            update(&inc.id, &["status"], pb::IncidentStatus::Open),
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let note = incidents(&app)
        .add_note(with_key(
            pb::AddNoteRequest {
                incident_id: inc.id.clone(),
                text: "blocked at the edge".into(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(note.subject, "blocked at the edge");
    // The bare key id, as CreateApiKey and WhoAmI return it (issue 11, item 4).
    assert_eq!(note.actor, app.key_id(&key).await);

    // Resolve, then a new alert for the same address reopens it.
    incidents(&app)
        .update_incident(with_key(
            update(&inc.id, &["status"], pb::IncidentStatus::Resolved),
            &key,
        ))
        .await
        .unwrap();
    burst(&app, &key, "b2", "203.0.113.50", "bob").await;
    // The watch may still hold changes from before the resolve: the log is
    // ordered, so the reopen is the first Open state after the Resolved one.
    let mut resolved_seen = false;
    loop {
        let (c, _) = next_change(&mut all).await;
        let i = c.incident.unwrap();
        if i.id == inc.id && i.status == pb::IncidentStatus::Resolved as i32 {
            resolved_seen = true;
        }
        if resolved_seen && i.id == inc.id && i.status == pb::IncidentStatus::Open as i32 {
            assert!(c.entry.is_some());
            let t = incidents(&app)
                .get_incident(with_key(
                    pb::GetIncidentRequest {
                        incident_id: inc.id.clone(),
                    },
                    &key,
                ))
                .await
                .unwrap()
                .into_inner()
                .timeline;
            assert!(
                t.iter()
                    .any(|e| e.kind == pb::TimelineEntryKind::Reopened as i32),
                "no reopen on the timeline"
            );
            break;
        }
    }

    // Merge a manual incident into it.
    let manual = incidents(&app)
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: "Reported by the SOC".into(),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    let merged = incidents(&app)
        .merge_incidents(with_key(
            pb::MergeIncidentsRequest {
                target_incident_id: inc.id.clone(),
                source_incident_ids: vec![manual.id.clone()],
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    assert_eq!(merged.id, inc.id);
    let closed = incidents(&app)
        .get_incident(with_key(
            pb::GetIncidentRequest {
                incident_id: manual.id.clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    let closed_inc = closed.incident.unwrap();
    assert_eq!(closed_inc.status, pb::IncidentStatus::Closed as i32);
    assert_eq!(closed_inc.merged_into_id, inc.id);
    assert!(
        closed
            .timeline
            .iter()
            .any(|t| t.kind == pb::TimelineEntryKind::Merged as i32)
    );

    // Listing and tenant isolation.
    let list = incidents(&app)
        .list_incidents(with_key(
            pb::ListIncidentsRequest {
                filter: Some(pb::IncidentFilter {
                    statuses: vec![pb::IncidentStatus::Open as i32],
                    ..Default::default()
                }),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incidents;
    assert!(list.iter().any(|i| i.id == inc.id));
    let (_, other) = app.tenant_with_key("other", &[pb::Scope::Read]).await;
    let err = incidents(&app)
        .get_incident(with_key(
            pb::GetIncidentRequest {
                incident_id: inc.id.clone(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn watch_resumes_across_disconnect_and_restart(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let settings = common::test_settings(&db);
    let mut app = common::spawn_with(db, settings.clone()).await;
    let (_, key) = app
        .tenant_with_key(
            "acme",
            &[pb::Scope::Ingest, pb::Scope::Read, pb::Scope::Respond],
        )
        .await;
    let inc = incidents(&app)
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: "Watched".into(),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    let mut one = incidents(&app)
        .watch_incident(with_key(
            pb::WatchIncidentRequest {
                incident_id: inc.id.clone(),
                options: None,
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    let (snap, snap_cursor) = next_one(&mut one).await;
    assert_eq!(snap.kind, pb::IncidentChangeKind::Snapshot as i32);
    assert!(!snap_cursor.is_empty());
    let note = |text: &str| pb::AddNoteRequest {
        incident_id: inc.id.clone(),
        text: text.into(),
    };
    incidents(&app)
        .add_note(with_key(note("n1"), &key))
        .await
        .unwrap();
    let (c1, cursor1) = next_one(&mut one).await;
    assert_eq!(c1.entry.unwrap().subject, "n1");
    drop(one);

    // Changes while disconnected, then a restart, then one more.
    incidents(&app)
        .add_note(with_key(note("n2"), &key))
        .await
        .unwrap();
    incidents(&app)
        .add_note(with_key(note("n3"), &key))
        .await
        .unwrap();
    app.stop().await.unwrap();
    let db = std::mem::replace(&mut app.db, common::TestDb::placeholder());
    drop(app);
    let mut app = common::spawn_with(db, settings).await;
    incidents(&app)
        .add_note(with_key(note("n4"), &key))
        .await
        .unwrap();

    let mut resumed = incidents(&app)
        .watch_incident(with_key(
            pb::WatchIncidentRequest {
                incident_id: inc.id.clone(),
                options: Some(pb::WatchOptions {
                    after_cursor: cursor1,
                    heartbeat_interval_seconds: 1,
                }),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut notes = Vec::new();
    while notes.len() < 3 {
        let (c, _) = next_one(&mut resumed).await;
        assert_ne!(
            c.kind,
            pb::IncidentChangeKind::Snapshot as i32,
            "a resumed watch sends no snapshot"
        );
        notes.push(c.entry.unwrap().subject);
    }
    assert_eq!(
        notes,
        ["n2", "n3", "n4"],
        "lost or repeated changes across the restart"
    );

    // A heartbeat arrives while idle, and the stream ends cleanly on shutdown.
    loop {
        let item = resumed.message().await.unwrap().unwrap();
        if matches!(
            item.item,
            Some(pb::watch_incident_response::Item::Heartbeat(_))
        ) {
            break;
        }
    }
    app.trigger_shutdown();
    while let Some(item) = resumed.message().await.expect("clean end, not an error") {
        let _ = item;
    }
    app.join().await.unwrap();
}

/// The value of the `picket_watch_rewinds_total` counter for incidents.
async fn incident_rewinds(app: &TestApp) -> f64 {
    let (_, _, body) = common::http1(app.addr, "GET", "/metrics", &[], vec![]).await;
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(r#"picket_watch_rewinds_total{stream="incidents"} "#))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Asserts that `subjects` are the notes `note-0 …` to `note-{n-1} …`, in
/// order; names the first one out of place.
fn assert_in_order(subjects: &[String], n: usize, who: &str) {
    let numbers: Vec<usize> = subjects
        .iter()
        .map(|s| {
            s.strip_prefix("note-")
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX)
        })
        .collect();
    let expected: Vec<usize> = (0..n).collect();
    if let Some(i) = (0..n).find(|&i| numbers.get(i) != Some(&i)) {
        panic!(
            "{who}: change {i} is note {:?}; around it: {:?}",
            numbers.get(i),
            &numbers[i.saturating_sub(3)..(i + 3).min(numbers.len())]
        );
    }
    assert_eq!(numbers, expected, "{who}");
}

/// Reads a watch stream up to the end of its snapshot.
async fn past_snapshot(s: &mut tonic::Streaming<pb::WatchIncidentsResponse>) {
    loop {
        let item = s.message().await.unwrap().expect("stream ended");
        if let Some(pb::watch_incidents_response::Item::SnapshotComplete(_)) = item.item {
            return;
        }
    }
}

/// A subscriber that stops reading holds up neither writers nor other
/// subscribers: it falls behind the feed's shared buffer and is rewound to
/// its own position, and when it reads again it gets every change, in order,
/// exactly once.
async fn a_stalled_subscriber_is_isolated_and_loses_nothing(backend: Backend) {
    const NOTES: usize = 400;
    let app = common::spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Read, pb::Scope::Respond])
        .await;
    let id = incidents(&app)
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: "Busy".into(),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap()
        .id;
    // Its own connection (HTTP/2 flow control is per connection too, and a
    // client that shares one with a stalled stream stalls itself), with
    // HTTP/2's default 64 KiB windows rather than the client library's
    // megabytes, so the stall reaches the server after a few notes.
    let own = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut stalled = pb::incident_service_client::IncidentServiceClient::new(own)
        .watch_incidents(with_key(
            pb::WatchIncidentsRequest {
                filter: None,
                options: None,
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    past_snapshot(&mut stalled).await;
    let mut live = watch_all(&app, &key).await;
    past_snapshot(&mut live).await;
    let reader = tokio::spawn(async move {
        let mut subjects = Vec::with_capacity(NOTES);
        while subjects.len() < NOTES {
            let (c, _) = next_change(&mut live).await;
            subjects.push(c.entry.unwrap().subject);
        }
        subjects
    });
    let rewinds = incident_rewinds(&app).await;

    // Large notes fill the stalled stream's transport window quickly.
    let filler = "x".repeat(4096);
    let mut writer = incidents(&app);
    let writes = async {
        for n in 0..NOTES {
            writer
                .add_note(with_key(
                    pb::AddNoteRequest {
                        incident_id: id.clone(),
                        text: format!("note-{n} {filler}"),
                    },
                    &key,
                ))
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), writes)
        .await
        .expect("writes were held up");
    let seen = tokio::time::timeout(std::time::Duration::from_secs(60), reader)
        .await
        .expect("the reading subscriber was held up")
        .unwrap();
    assert_in_order(&seen, NOTES, "the reading subscriber");

    // Reading again, the stalled subscriber gets everything, once, in order:
    // it had overflowed the shared buffer and was rewound to its position.
    let mut got = Vec::with_capacity(NOTES);
    let read = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while got.len() < NOTES {
            let (c, _) = next_change(&mut stalled).await;
            got.push(c.entry.unwrap().subject);
        }
    })
    .await;
    if read.is_err() {
        assert_in_order(&got, got.len(), "the stalled subscriber");
        panic!(
            "the stalled subscriber got only {} of {NOTES} changes",
            got.len()
        );
    }
    assert_in_order(&got, NOTES, "the stalled subscriber");
    assert!(
        incident_rewinds(&app).await > rewinds,
        "the stalled subscriber overflowed the shared buffer and was rewound"
    );
}

crate::both_backends!(
    alerts_correlate_into_incidents_with_a_timeline,
    watch_resumes_across_disconnect_and_restart,
    a_stalled_subscriber_is_isolated_and_loses_nothing
);
