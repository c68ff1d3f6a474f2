//! Playbooks and runs against the real server (both backends): validation
//! and versions, approvals (distinct approvers, bound parameters, 50 at
//! once), expiry, the runs watch, triggers, idempotent effects, undo, signed
//! notifications and refused internal targets. A local HTTP receiver stands
//! in for a tenant's notification endpoint.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use picket::grpc::pb;
use picket::storage::Backend;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{self, TestApp, with_key};

pub type Playbooks = pb::playbook_service_client::PlaybookServiceClient<Channel>;

/// Longest wait for anything asynchronous: a missing outcome fails the test.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn playbooks(channel: &Channel) -> Playbooks {
    pb::playbook_service_client::PlaybookServiceClient::new(channel.clone())
}

pub fn incidents(channel: &Channel) -> pb::incident_service_client::IncidentServiceClient<Channel> {
    pb::incident_service_client::IncidentServiceClient::new(channel.clone())
}

/// Every scope.
pub const ALL: [pb::Scope; 4] = [
    pb::Scope::Ingest,
    pb::Scope::Read,
    pb::Scope::Respond,
    pb::Scope::Admin,
];

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub key: String,
    pub signature: String,
    pub body: Vec<u8>,
}

/// A tenant's notification endpoint: records every POST, answers 200 (or,
/// if told to, holds the first request open for ever).
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    pub async fn start(hold_first: bool) -> Self {
        use axum::routing::post;
        let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let state = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |headers: http::HeaderMap, body: bytes::Bytes| {
                let seen = state.clone();
                async move {
                    let header = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let first = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Delivery {
                            key: header("idempotency-key"),
                            signature: header("x-picket-signature"),
                            body: body.to_vec(),
                        });
                        seen.len() == 1
                    };
                    if hold_first && first {
                        // The sender is killed while it waits here.
                        std::future::pending::<()>().await;
                    }
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.seen.lock().unwrap().clone()
    }

    /// Distinct idempotency keys: the effects a deduplicating receiver applies.
    pub fn effects(&self) -> BTreeSet<String> {
        self.deliveries().into_iter().map(|d| d.key).collect()
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Delivery> {
        let started = Instant::now();
        loop {
            let d = self.deliveries();
            if d.len() >= n {
                return d;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "only {} of {n} deliveries",
                d.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Settings of a test server whose notifications may reach this machine.
pub fn allowing_loopback(db: &common::TestDb) -> picket::server::config::Settings {
    let mut s = common::test_settings(db);
    s.notify_allow_cidr = vec!["127.0.0.0/8".parse().unwrap()];
    s.playbook_poll_ms = 50;
    s
}

pub async fn app_allowing_loopback(backend: Backend) -> TestApp {
    let db = common::TestDb::new(backend).await;
    let settings = allowing_loopback(&db);
    common::spawn_with(db, settings).await
}

pub fn step(name: &str, action: pb::ActionKind, params: &[(&str, &str)]) -> pb::PlaybookStep {
    pb::PlaybookStep {
        name: name.into(),
        action: action as i32,
        params: params
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        requires_approval: false,
        timeout_seconds: 0,
        max_attempts: 0,
    }
}

pub fn approved(mut s: pb::PlaybookStep) -> pb::PlaybookStep {
    s.requires_approval = true;
    s
}

pub fn playbook(name: &str, steps: Vec<pb::PlaybookStep>) -> pb::Playbook {
    pb::Playbook {
        name: name.into(),
        steps,
        enabled: true,
        ..Default::default()
    }
}

pub async fn create(channel: &Channel, key: &str, p: pb::Playbook) -> pb::Playbook {
    playbooks(channel)
        .create_playbook(with_key(
            pb::CreatePlaybookRequest { playbook: Some(p) },
            key,
        ))
        .await
        .expect("create playbook")
        .into_inner()
        .playbook
        .unwrap()
}

/// Opens an incident about `ip` (and `actor`, if not empty) by hand.
pub async fn incident(channel: &Channel, key: &str, title: &str, ip: &str, actor: &str) -> String {
    let mut entities = vec![pb::Entity {
        kind: pb::EntityKind::Ip as i32,
        value: ip.into(),
    }];
    if !actor.is_empty() {
        entities.push(pb::Entity {
            kind: pb::EntityKind::Actor as i32,
            value: actor.into(),
        });
    }
    incidents(channel)
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: title.into(),
                severity: pb::Severity::High as i32,
                entities,
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("create incident")
        .into_inner()
        .incident
        .unwrap()
        .id
}

pub async fn start(
    channel: &Channel,
    key: &str,
    playbook_id: &str,
    incident_id: &str,
) -> Result<pb::PlaybookRun, tonic::Status> {
    playbooks(channel)
        .start_playbook_run(with_key(
            pb::StartPlaybookRunRequest {
                playbook_id: playbook_id.into(),
                incident_id: incident_id.into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .map(|r| r.into_inner().run.unwrap())
}

pub async fn get_run(channel: &Channel, key: &str, id: &str) -> pb::PlaybookRun {
    playbooks(channel)
        .get_playbook_run(with_key(
            pb::GetPlaybookRunRequest { run_id: id.into() },
            key,
        ))
        .await
        .expect("get run")
        .into_inner()
        .run
        .unwrap()
}

/// Waits until the run reaches a terminal state; returns it.
pub async fn finished(channel: &Channel, key: &str, id: &str) -> pb::PlaybookRun {
    let started = Instant::now();
    loop {
        let run = get_run(channel, key, id).await;
        let done = !matches!(
            pb::RunStatus::try_from(run.status).unwrap(),
            pb::RunStatus::PendingApproval | pb::RunStatus::Approved | pb::RunStatus::Running
        );
        if done {
            return run;
        }
        assert!(started.elapsed() < DEADLINE, "run never finished: {run:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn approve(
    channel: &Channel,
    key: &str,
    run: &str,
    digest: &str,
) -> Result<pb::PlaybookRun, tonic::Status> {
    playbooks(channel)
        .approve_playbook_run(with_key(
            pb::ApprovePlaybookRunRequest {
                run_id: run.into(),
                comment: "ok".into(),
                params_digest: digest.into(),
            },
            key,
        ))
        .await
        .map(|r| r.into_inner().run.unwrap())
}

pub fn status(run: &pb::PlaybookRun) -> pb::RunStatus {
    pb::RunStatus::try_from(run.status).unwrap()
}

/// The incident's timeline entries written by `run`.
pub async fn entries_of(
    channel: &Channel,
    key: &str,
    incident: &str,
    run: &str,
) -> Vec<pb::TimelineEntry> {
    incidents(channel)
        .get_incident(with_key(
            pb::GetIncidentRequest {
                incident_id: incident.into(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
        .timeline
        .into_iter()
        .filter(|e| e.actor == format!("playbook-run:{run}"))
        .collect()
}

/// Whether a delivery's signature verifies under `secret`.
pub fn signed_by(d: &Delivery, secret: &str) -> bool {
    picket::webhooks::verify_signature(
        secret.as_bytes(),
        Some(&d.signature),
        None,
        &d.body,
        false,
        chrono::Utc::now(),
    )
    .is_ok()
}

async fn playbooks_are_validated_versioned_and_listed(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("pb-crud", &ALL).await;
    let ch = &app.channel;

    // An unknown template is refused at create time, naming step and parameter.
    let bad = playbook(
        "contain",
        vec![
            step("block", pb::ActionKind::BlockIp, &[("ip", "{{entity.ip}}")]),
            step(
                "note",
                pb::ActionKind::AddIncidentNote,
                &[("text", "owner: {{incident.owner}}")],
            ),
            step(
                "notify",
                pb::ActionKind::NotifyWebhook,
                &[("colour", "red")],
            ),
        ],
    );
    let err = playbooks(ch)
        .create_playbook(with_key(
            pb::CreatePlaybookRequest {
                playbook: Some(bad),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    use tonic_types::StatusExt;
    let violations = err.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "playbook.steps[1].params[text]");
    assert!(
        violations[0].description.contains("step `note`")
            && violations[0].description.contains("{{incident.owner}}"),
        "{violations:?}"
    );
    assert_eq!(violations[1].field, "playbook.steps[2].params[colour]");

    let good = playbook(
        "contain",
        vec![step(
            "note",
            pb::ActionKind::AddIncidentNote,
            &[("text", "seen {{entity.ip}}")],
        )],
    );
    let p = create(ch, &key, good.clone()).await;
    assert_eq!(p.version, 1);
    assert_eq!(p.origin, pb::PlaybookOrigin::Tenant as i32);
    let err = playbooks(ch)
        .create_playbook(with_key(
            pb::CreatePlaybookRequest {
                playbook: Some(good.clone()),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Optimistic versions.
    let mut changed = p.clone();
    changed.description = "v2".into();
    changed.version = 7;
    let err = playbooks(ch)
        .update_playbook(with_key(
            pb::UpdatePlaybookRequest {
                playbook: Some(changed.clone()),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    changed.version = 1;
    let v2 = playbooks(ch)
        .update_playbook(with_key(
            pb::UpdatePlaybookRequest {
                playbook: Some(changed),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .playbook
        .unwrap();
    assert_eq!((v2.version, v2.description.as_str()), (2, "v2"));

    // The built-in pack is listed beside the tenant's own, by name; a tenant
    // playbook of a built-in's name replaces it; built-ins are read-only.
    let names = |list: &[pb::Playbook]| -> Vec<(String, i32)> {
        list.iter().map(|p| (p.name.clone(), p.origin)).collect()
    };
    let list = playbooks(ch)
        .list_playbooks(with_key(pb::ListPlaybooksRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .playbooks;
    let builtin = pb::PlaybookOrigin::Builtin as i32;
    let tenant = pb::PlaybookOrigin::Tenant as i32;
    assert_eq!(
        names(&list),
        [
            ("contain".to_owned(), tenant),
            ("contain-brute-force".to_owned(), builtin),
            ("disable-compromised-account".to_owned(), builtin),
            ("throttle-quota-breach".to_owned(), builtin),
        ]
    );
    let brute = list[1].clone();
    let err = playbooks(ch)
        .update_playbook(with_key(
            pb::UpdatePlaybookRequest {
                playbook: Some(brute.clone()),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut mine = brute.clone();
    mine.enabled = false;
    create(ch, &key, mine).await;
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = playbooks(ch)
            .list_playbooks(with_key(
                pb::ListPlaybooksRequest {
                    page_size: 2,
                    page_token: token,
                },
                &key,
            ))
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.playbooks);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        names(&paged),
        [
            ("contain".to_owned(), tenant),
            ("contain-brute-force".to_owned(), tenant),
            ("disable-compromised-account".to_owned(), builtin),
            ("throttle-quota-breach".to_owned(), builtin),
        ]
    );
    // The replaced built-in cannot be started for this tenant.
    let inc = incident(ch, &key, "x", "203.0.113.5", "").await;
    let err = start(ch, &key, &brute.id, &inc).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Scopes: reading is not administering.
    let (_, reader) = app
        .tenant_with_key("pb-crud-reader", &[pb::Scope::Read])
        .await;
    let err = playbooks(ch)
        .create_playbook(with_key(
            pb::CreatePlaybookRequest {
                playbook: Some(good),
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Another tenant does not see this tenant's playbook.
    let err = playbooks(ch)
        .get_playbook(with_key(
            pb::GetPlaybookRequest {
                playbook_id: p.id.clone(),
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let gone = playbooks(ch)
        .delete_playbook(with_key(
            pb::DeletePlaybookRequest {
                playbook_id: p.id.clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.cancelled_runs, 0);
    // Deleting a playbook cancels its runs that have not finished.
    let held = create(
        ch,
        &key,
        playbook(
            "held",
            vec![approved(step(
                "note",
                pb::ActionKind::AddIncidentNote,
                &[("text", "x")],
            ))],
        ),
    )
    .await;
    let waiting = start(ch, &key, &held.id, &inc).await.unwrap();
    let gone = playbooks(ch)
        .delete_playbook(with_key(
            pb::DeletePlaybookRequest {
                playbook_id: held.id.clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.cancelled_runs, 1);
    let waiting = get_run(ch, &key, &waiting.id).await;
    assert_eq!(status(&waiting), pb::RunStatus::Cancelled);
    assert!(
        waiting.status_reason.contains("deleted"),
        "{}",
        waiting.status_reason
    );
    let err = playbooks(ch)
        .delete_playbook(with_key(
            pb::DeletePlaybookRequest {
                playbook_id: brute.id,
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

async fn approvals_are_distinct_bound_and_exact(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (tenant, requester) = app.tenant_with_key("pb-approve", &ALL).await;
    let a1 = app
        .key_for(&tenant, &[pb::Scope::Respond, pb::Scope::Read])
        .await;
    let a2 = app
        .key_for(&tenant, &[pb::Scope::Respond, pb::Scope::Read])
        .await;
    let ch = &app.channel;
    let inc = incident(ch, &requester, "Brute force", "203.0.113.9", "").await;
    let mut def = playbook(
        "two-eyes",
        vec![approved(step(
            "note",
            pb::ActionKind::AddIncidentNote,
            &[("text", "Blocked {{entity.ip}} for {{incident.title}}")],
        ))],
    );
    def.required_approvals = 2;
    let p = create(ch, &requester, def).await;
    let run = start(ch, &requester, &p.id, &inc).await.unwrap();
    assert_eq!(status(&run), pb::RunStatus::PendingApproval);
    // The approver sees exactly what will execute.
    assert_eq!(
        run.steps[0].params["text"],
        "Blocked 203.0.113.9 for Brute force"
    );
    assert_eq!(run.params_digest.len(), 64);
    let digest = run.params_digest.clone();

    let err = approve(ch, &requester, &run.id, "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = approve(ch, &a1, &run.id, &"0".repeat(64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let after_one = approve(ch, &a1, &run.id, &digest).await.unwrap();
    assert_eq!(status(&after_one), pb::RunStatus::PendingApproval);
    let err = approve(ch, &a1, &run.id, &digest).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Changing the playbook does not change what was approved.
    let mut changed = p.clone();
    changed.steps[0]
        .params
        .insert("text".into(), "something else".into());
    playbooks(ch)
        .update_playbook(with_key(
            pb::UpdatePlaybookRequest {
                playbook: Some(changed),
            },
            &requester,
        ))
        .await
        .unwrap();
    let last = approve(ch, &a2, &run.id, &digest).await.unwrap();
    assert_eq!(status(&last), pb::RunStatus::Approved);
    let done = finished(ch, &requester, &run.id).await;
    assert_eq!(status(&done), pb::RunStatus::Succeeded, "{done:?}");
    assert_eq!(done.approvals.len(), 2);
    assert!(done.approvals.iter().all(|a| a.params_digest == digest));
    assert_eq!(done.step_results[0].state, pb::StepState::Succeeded as i32);
    assert_eq!(done.step_results[0].attempts, 1);
    let notes = entries_of(ch, &requester, &inc, &run.id).await;
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].subject, "Blocked 203.0.113.9 for Brute force");

    // Finished, rejected, cancelled or expired runs cannot be approved.
    let err = approve(ch, &a1, &run.id, "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let p2 = create(
        ch,
        &requester,
        playbook(
            "to-reject",
            vec![approved(step(
                "note",
                pb::ActionKind::AddIncidentNote,
                &[("text", "x")],
            ))],
        ),
    )
    .await;
    let r2 = start(ch, &requester, &p2.id, &inc).await.unwrap();
    let rejected = playbooks(ch)
        .reject_playbook_run(with_key(
            pb::RejectPlaybookRunRequest {
                run_id: r2.id.clone(),
                comment: "not now".into(),
            },
            &a1,
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status(&rejected), pb::RunStatus::Rejected);
    let err = approve(ch, &a2, &r2.id, "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let r3 = start(ch, &requester, &p2.id, &inc).await.unwrap();
    let cancelled = playbooks(ch)
        .cancel_playbook_run(with_key(
            pb::CancelPlaybookRunRequest {
                run_id: r3.id.clone(),
                reason: "wrong incident".into(),
            },
            &requester,
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status(&cancelled), pb::RunStatus::Cancelled);
    assert_eq!(
        cancelled.step_results[0].state,
        pb::StepState::Skipped as i32
    );
    let err = approve(ch, &a2, &r3.id, "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(entries_of(ch, &requester, &inc, &r3.id).await.is_empty());

    // A template without a value refuses the run, naming step and parameter.
    let p3 = create(
        ch,
        &requester,
        playbook(
            "needs-actor",
            vec![step(
                "disable",
                pb::ActionKind::DisableActor,
                &[("actor", "{{entity.actor}}")],
            )],
        ),
    )
    .await;
    let err = start(ch, &requester, &p3.id, &inc).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("steps[0].params[actor]"),
        "{}",
        err.message()
    );
}

async fn fifty_concurrent_approvals_execute_once(backend: Backend) {
    let app = app_allowing_loopback(backend).await;
    let receiver = Receiver::start(false).await;
    let (tenant, requester) = app.tenant_with_key("pb-fifty", &ALL).await;
    let ch = app.channel.clone();
    let inc = incident(&ch, &requester, "Fifty", "203.0.113.50", "").await;
    let p = create(
        &ch,
        &requester,
        playbook(
            "once",
            vec![
                approved(step(
                    "note",
                    pb::ActionKind::AddIncidentNote,
                    &[("text", "approved once")],
                )),
                step(
                    "notify",
                    pb::ActionKind::NotifyWebhook,
                    &[("url", &receiver.url()), ("message", "once")],
                ),
            ],
        ),
    )
    .await;
    let mut approvers = Vec::new();
    for _ in 0..50 {
        approvers.push(app.key_for(&tenant, &[pb::Scope::Respond]).await);
    }
    let run = start(&ch, &requester, &p.id, &inc).await.unwrap();
    let tasks: Vec<_> = approvers
        .into_iter()
        .map(|k| {
            let (ch, id) = (ch.clone(), run.id.clone());
            tokio::spawn(async move { approve(&ch, &k, &id, "").await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        }
    }
    assert_eq!(ok, 1, "exactly one approval is recorded");
    let done = finished(&ch, &requester, &run.id).await;
    assert_eq!(status(&done), pb::RunStatus::Succeeded, "{done:?}");
    assert_eq!(done.approvals.len(), 1);
    assert!(
        done.step_results.iter().all(|r| r.attempts == 1),
        "{done:?}"
    );
    assert_eq!(entries_of(&ch, &requester, &inc, &run.id).await.len(), 1);
    assert_eq!(receiver.wait_for(1).await.len(), 1);
    assert_eq!(receiver.effects().len(), 1);
}

async fn pending_runs_expire_on_time(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (tenant, key) = app.tenant_with_key("pb-expire", &ALL).await;
    let approver = app.key_for(&tenant, &[pb::Scope::Respond]).await;
    let ch = &app.channel;
    let inc = incident(ch, &key, "Late", "203.0.113.60", "").await;
    let p = create(
        ch,
        &key,
        playbook(
            "slow",
            vec![approved(step(
                "note",
                pb::ActionKind::AddIncidentNote,
                &[("text", "x")],
            ))],
        ),
    )
    .await;
    let mut inbox = watch(ch, &key, &[pb::RunStatus::PendingApproval], "").await;
    let run = playbooks(ch)
        .start_playbook_run(with_key(
            pb::StartPlaybookRunRequest {
                playbook_id: p.id.clone(),
                incident_id: inc.clone(),
                approval_timeout_seconds: 1,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let deadline = run.approval_deadline.unwrap();
    let deadline =
        chrono::DateTime::from_timestamp(deadline.seconds, deadline.nanos as u32).unwrap();
    let (created, _) = next_change(&mut inbox).await;
    assert_eq!(created.kind, pb::RunChangeKind::Created as i32);
    // The expiry leaves the inbox: delivered although EXPIRED is not watched.
    let (expired, _) = next_change(&mut inbox).await;
    let seen_at = chrono::Utc::now();
    let r = expired.run.unwrap();
    assert_eq!(status(&r), pb::RunStatus::Expired, "{r:?}");
    assert!(seen_at >= deadline, "expired before its deadline");
    assert!(
        seen_at - deadline < chrono::Duration::milliseconds(2500),
        "expired {} late",
        seen_at - deadline
    );
    assert!(r.status_reason.contains("deadline"), "{}", r.status_reason);
    let err = approve(ch, &approver, &run.id, "").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

pub async fn watch(
    ch: &Channel,
    key: &str,
    statuses: &[pb::RunStatus],
    after: &str,
) -> tonic::Streaming<pb::WatchPlaybookRunsResponse> {
    playbooks(ch)
        .watch_playbook_runs(with_key(
            pb::WatchPlaybookRunsRequest {
                statuses: statuses.iter().map(|s| *s as i32).collect(),
                playbook_id: String::new(),
                options: Some(pb::WatchOptions {
                    after_cursor: after.into(),
                    heartbeat_interval_seconds: 1,
                }),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The next change (skipping heartbeats and the snapshot marker) and its cursor.
pub async fn next_change(
    s: &mut tonic::Streaming<pb::WatchPlaybookRunsResponse>,
) -> (pb::PlaybookRunChange, String) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let item = s.message().await.unwrap().expect("stream ended");
            if let Some(pb::watch_playbook_runs_response::Item::Change(c)) = item.item {
                return (c, item.cursor);
            }
        }
    })
    .await
    .expect("no change arrived")
}

async fn runs_watch_snapshots_and_resumes(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (tenant, key) = app.tenant_with_key("pb-watch", &ALL).await;
    let approver = app.key_for(&tenant, &[pb::Scope::Respond]).await;
    let ch = &app.channel;
    let inc = incident(ch, &key, "Watched", "203.0.113.70", "").await;
    let p = create(
        ch,
        &key,
        playbook(
            "inbox",
            vec![approved(step(
                "note",
                pb::ActionKind::AddIncidentNote,
                &[("text", "x")],
            ))],
        ),
    )
    .await;
    let r1 = start(ch, &key, &p.id, &inc).await.unwrap();
    let mut inbox = watch(ch, &key, &[pb::RunStatus::PendingApproval], "").await;
    let (snap, _) = next_change(&mut inbox).await;
    assert_eq!(snap.kind, pb::RunChangeKind::Snapshot as i32);
    assert_eq!(snap.run.unwrap().id, r1.id);
    let r2 = start(ch, &key, &p.id, &inc).await.unwrap();
    let (created, cursor) = next_change(&mut inbox).await;
    assert_eq!(created.kind, pb::RunChangeKind::Created as i32);
    assert_eq!(created.run.unwrap().id, r2.id);
    drop(inbox);
    // While nobody watches: r1 approved (it leaves the inbox, then runs), r2 cancelled.
    approve(ch, &approver, &r1.id, "").await.unwrap();
    finished(ch, &key, &r1.id).await;
    playbooks(ch)
        .cancel_playbook_run(with_key(
            pb::CancelPlaybookRunRequest {
                run_id: r2.id.clone(),
                reason: String::new(),
            },
            &key,
        ))
        .await
        .unwrap();
    let mut resumed = watch(ch, &key, &[pb::RunStatus::PendingApproval], &cursor).await;
    let (a, _) = next_change(&mut resumed).await;
    let a = a.run.unwrap();
    assert_eq!(
        (a.id.as_str(), status(&a)),
        (r1.id.as_str(), pb::RunStatus::Approved)
    );
    let (b, _) = next_change(&mut resumed).await;
    let b = b.run.unwrap();
    assert_eq!(
        (b.id.as_str(), status(&b)),
        (r2.id.as_str(), pb::RunStatus::Cancelled)
    );
    // Nothing else: the heartbeat comes next.
    let item = tokio::time::timeout(DEADLINE, resumed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            item.item,
            Some(pb::watch_playbook_runs_response::Item::Heartbeat(_))
        ),
        "{item:?}"
    );
}

async fn internal_notification_targets_are_refused(backend: Backend) {
    // The default settings: only public addresses.
    let app = common::spawn_app(backend).await;
    let receiver = Receiver::start(false).await;
    let (_, key) = app.tenant_with_key("pb-ssrf", &ALL).await;
    let ch = &app.channel;
    let inc = incident(ch, &key, "Probe", "203.0.113.80", "").await;
    let by_name = format!("http://localhost:{}/hook", receiver.addr.port());
    for (n, url) in [
        receiver.url(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        by_name.clone(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut notify = step("notify", pb::ActionKind::NotifyWebhook, &[("url", &url)]);
        notify.max_attempts = 5;
        let p = create(ch, &key, playbook(&format!("probe-{n}"), vec![notify])).await;
        let run = start(ch, &key, &p.id, &inc).await.unwrap();
        let done = finished(ch, &key, &run.id).await;
        assert_eq!(status(&done), pb::RunStatus::Failed, "{done:?}");
        let r = &done.step_results[0];
        assert_eq!(r.state, pb::StepState::Failed as i32);
        assert_eq!(r.attempts, 1, "a refusal is not retried");
        assert!(r.message.starts_with("refused"), "{}", r.message);
        if url == by_name {
            // What a name resolves to is not revealed.
            assert!(!r.message.contains("127.0.0.1"), "{}", r.message);
        }
    }
    assert!(receiver.deliveries().is_empty());
}

async fn notifications_are_signed_with_the_tenant_secret(backend: Backend) {
    let app = app_allowing_loopback(backend).await;
    let receiver = Receiver::start(false).await;
    let (_, key) = app.tenant_with_key("pb-signed", &ALL).await;
    let ch = &app.channel;
    playbooks(ch)
        .update_notification_settings(with_key(
            pb::UpdateNotificationSettingsRequest {
                url: receiver.url(),
            },
            &key,
        ))
        .await
        .unwrap();
    let inc = incident(ch, &key, "Signed", "203.0.113.90", "").await;
    // No URL on the step: the tenant's notification URL.
    let p = create(
        ch,
        &key,
        playbook(
            "tell",
            vec![step(
                "notify",
                pb::ActionKind::NotifyWebhook,
                &[("message", "ip {{entity.ip}}")],
            )],
        ),
    )
    .await;
    let run = start(ch, &key, &p.id, &inc).await.unwrap();
    assert_eq!(
        status(&finished(ch, &key, &run.id).await),
        pb::RunStatus::Succeeded
    );
    let got = receiver.wait_for(1).await;
    let secret = playbooks(ch)
        .get_notification_settings(with_key(pb::GetNotificationSettingsRequest {}, &key))
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert!(secret.starts_with("whsec_"));
    assert!(signed_by(&got[0], &secret));
    assert_eq!(got[0].key, format!("run:{}:step:0", run.id));
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["run_id"], run.id.as_str());
    assert_eq!(body["message"], "ip 203.0.113.90");
    assert_eq!(body["incident"]["id"], inc.as_str());

    // After a rotation only the new secret verifies.
    let rotated = playbooks(ch)
        .rotate_notification_secret(with_key(pb::RotateNotificationSecretRequest {}, &key))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let run = start(ch, &key, &p.id, &inc).await.unwrap();
    finished(ch, &key, &run.id).await;
    let got = receiver.wait_for(2).await;
    assert!(signed_by(&got[1], &rotated));
    assert!(!signed_by(&got[1], &secret));

    // A receiver that does not exist: retried with backoff, then failed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/hook", dead.local_addr().unwrap());
    drop(dead);
    let mut flaky = step(
        "notify",
        pb::ActionKind::NotifyWebhook,
        &[("url", &dead_url)],
    );
    flaky.max_attempts = 2;
    let p = create(ch, &key, playbook("dead-end", vec![flaky])).await;
    let run = start(ch, &key, &p.id, &inc).await.unwrap();
    let done = finished(ch, &key, &run.id).await;
    assert_eq!(status(&done), pb::RunStatus::Failed);
    assert_eq!(done.step_results[0].attempts, 2, "{done:?}");
    assert!(
        done.status_reason.contains("notify"),
        "{}",
        done.status_reason
    );
}

async fn triggers_run_once_per_new_or_escalated_incident(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("pb-trigger", &ALL).await;
    let ch = &app.channel;
    let mut p = playbook(
        "auto-note",
        vec![step(
            "note",
            pb::ActionKind::AddIncidentNote,
            &[("text", "auto {{entity.ip}}")],
        )],
    );
    p.trigger = Some(pb::PlaybookTrigger {
        min_severity: pb::Severity::High as i32,
        categories: vec![],
        rules: vec![],
    });
    let p = create(ch, &key, p).await;
    let runs_for = |inc: String| {
        let (ch, key, pid) = (ch.clone(), key.clone(), p.id.clone());
        async move {
            playbooks(&ch)
                .list_playbook_runs(with_key(
                    pb::ListPlaybookRunsRequest {
                        playbook_id: pid,
                        incident_id: inc,
                        ..Default::default()
                    },
                    &key,
                ))
                .await
                .unwrap()
                .into_inner()
                .runs
        }
    };
    let wait_runs = |inc: String, n: usize| async move {
        let started = Instant::now();
        loop {
            let runs = runs_for(inc.clone()).await;
            if runs.len() >= n {
                return runs;
            }
            assert!(started.elapsed() < DEADLINE, "no automatic run");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // A new high incident gets one run, executed at once (no approval step).
    let high = incident(ch, &key, "New", "203.0.113.100", "").await;
    let runs = wait_runs(high.clone(), 1).await;
    assert!(runs[0].automatic);
    assert_eq!(runs[0].requested_by, "system");
    assert_eq!(
        status(&finished(ch, &key, &runs[0].id).await),
        pb::RunStatus::Succeeded
    );
    // A low incident gets none until it is escalated.
    let low = incidents(ch)
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: "Quiet".into(),
                severity: pb::Severity::Low as i32,
                entities: vec![pb::Entity {
                    kind: pb::EntityKind::Ip as i32,
                    value: "203.0.113.101".into(),
                }],
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
    incidents(ch)
        .update_incident(with_key(
            pb::UpdateIncidentRequest {
                incident_id: low.clone(),
                update_mask: vec!["severity".into()],
                severity: pb::Severity::Critical as i32,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap();
    let runs = wait_runs(low.clone(), 1).await;
    assert_eq!(runs.len(), 1);
    finished(ch, &key, &runs[0].id).await;
    // Later changes (the run's own note, another note) create no second run.
    incidents(ch)
        .add_note(with_key(
            pb::AddNoteRequest {
                incident_id: high.clone(),
                text: "still here".into(),
            },
            &key,
        ))
        .await
        .unwrap();
    // A run created after the note would be created by the wake-up the note
    // caused; an unrelated incident's run proves that wake-up was handled.
    let probe = incident(ch, &key, "Probe", "203.0.113.102", "").await;
    wait_runs(probe, 1).await;
    assert_eq!(runs_for(high).await.len(), 1);
    assert_eq!(runs_for(low).await.len(), 1);
}

async fn step_effects_happen_once_per_run_and_step(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (tenant, key) = app.tenant_with_key("pb-idem", &ALL).await;
    let tenant = picket::domain::TenantId(tenant.parse().unwrap());
    let ch = &app.channel;
    let inc = incident(ch, &key, "Twice", "203.0.113.110", "").await;
    let p = create(
        ch,
        &key,
        playbook(
            "effects",
            vec![
                approved(step(
                    "ban",
                    pb::ActionKind::BlockIp,
                    &[("ip", "{{entity.ip}}")],
                )),
                step("note", pb::ActionKind::AddIncidentNote, &[("text", "once")]),
                step(
                    "status",
                    pb::ActionKind::SetIncidentStatus,
                    &[("status", "contained")],
                ),
            ],
        ),
    )
    .await;
    // The engine's capability over the server's own store, as a crashed
    // worker's successor would call it: each step performed twice.
    let responder = picket::response::Responder::new(
        app.store.clone(),
        Vec::new(),
        Arc::new(picket::response::decisions::Decisions::new(
            app.store.clone(),
            Arc::new(picket::ingest::signal::Signal::new()),
            Arc::new(picket::response::enforcer::Enforcer::new(
                app.store.clone(),
                Arc::new(picket::ingest::signal::Signal::new()),
                Duration::from_millis(500),
                tokio_util::sync::CancellationToken::new(),
            )),
            1000,
        )),
        picket::response::notify::Notifier::new(Vec::new()),
        picket::webhooks::SecretBox::new(&picket::access::auth::KeyHasher::new(
            secrecy::SecretString::from("x".to_owned()),
        )),
        Arc::new(picket::ingest::signal::Signal::new()),
        picket::response::ResponseConfig::default(),
    );
    let pb_domain = app
        .store
        .get_playbook(tenant, p.id.parse().unwrap())
        .await
        .unwrap();
    let (run, resolved) = responder
        .prepare_run(
            tenant,
            &pb_domain,
            &picket::response::StartRun {
                playbook_id: pb_domain.id,
                incident_id: Some(inc.parse().unwrap()),
                alert_id: None,
                approval_timeout: chrono::Duration::hours(1),
                requested_by: "test".into(),
            },
        )
        .await
        .unwrap();
    resolved.unwrap();
    let mut decisions = BTreeSet::new();
    for _ in 0..2 {
        for i in 0..3 {
            let effect = responder.execute_step(&run, i).await.unwrap();
            if let Some(inverse) = effect.inverse {
                decisions.insert(inverse.decision_id);
            }
        }
    }
    assert_eq!(decisions.len(), 1, "one decision: {decisions:?}");
    let enforcement = pb::enforcement_service_client::EnforcementServiceClient::new(ch.clone());
    let listed = enforcement
        .clone()
        .list_decisions(with_key(pb::ListDecisionsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .decisions;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].value, "203.0.113.110");
    assert_eq!(listed[0].idempotency_key, format!("run:{}:step:0", run.id));
    let entries = entries_of(ch, &key, &inc, &run.id.to_string()).await;
    assert_eq!(
        entries.len(),
        2,
        "one note and one status change: {entries:?}"
    );
}

async fn decision_steps_ban_and_undo_records_who(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (tenant, key) = app.tenant_with_key("pb-undo", &ALL).await;
    let other = app
        .key_for(&tenant, &[pb::Scope::Respond, pb::Scope::Read])
        .await;
    let other_id = app.key_id(&other).await;
    let ch = &app.channel;
    let inc = incident(ch, &key, "Undo", "203.0.113.120", "mallory").await;
    let p = create(
        ch,
        &key,
        playbook(
            "ban-and-note",
            vec![
                step(
                    "ban",
                    pb::ActionKind::BlockIp,
                    &[("ip", "{{entity.ip}}"), ("duration_seconds", "3600")],
                ),
                step(
                    "disable",
                    pb::ActionKind::DisableActor,
                    &[("actor", "{{entity.actor}}")],
                ),
                step(
                    "note",
                    pb::ActionKind::AddIncidentNote,
                    &[("text", "banned")],
                ),
            ],
        ),
    )
    .await;
    let run = start(ch, &key, &p.id, &inc).await.unwrap();
    let done = finished(ch, &key, &run.id).await;
    assert_eq!(status(&done), pb::RunStatus::Succeeded, "{done:?}");
    assert!(
        done.step_results[0]
            .inverse
            .contains("banned 203.0.113.120")
    );
    let mut enforcement = pb::enforcement_service_client::EnforcementServiceClient::new(ch.clone());
    let decisions = enforcement
        .list_decisions(with_key(pb::ListDecisionsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .decisions;
    assert_eq!(decisions.len(), 2);
    for d in &decisions {
        let origin = d.origin.clone().unwrap();
        assert_eq!(origin.kind, pb::DecisionOriginKind::PlaybookRun as i32);
        assert_eq!(origin.id, run.id);
    }
    let ban = decisions
        .iter()
        .find(|d| d.value == "203.0.113.120")
        .unwrap();

    let undone = playbooks(ch)
        .undo_playbook_step(with_key(
            pb::UndoPlaybookStepRequest {
                run_id: run.id.clone(),
                step: "ban".into(),
                reason: "false positive".into(),
            },
            &other,
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let undo = undone.step_results[0].undo.clone().unwrap();
    assert_eq!(undo.undone_by, other_id);
    assert_eq!(undo.reason, "false positive");
    let revoked = enforcement
        .get_decision(with_key(
            pb::GetDecisionRequest {
                decision_id: ban.id.clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(revoked.state, pb::DecisionState::Revoked as i32);
    assert_eq!(revoked.revoked_by, other_id);
    for (step, why) in [("ban", "undone already"), ("note", "no inverse")] {
        let err = playbooks(ch)
            .undo_playbook_step(with_key(
                pb::UndoPlaybookStepRequest {
                    run_id: run.id.clone(),
                    step: step.into(),
                    reason: String::new(),
                },
                &other,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{step}: {err:?}");
        assert!(err.message().contains(why), "{}", err.message());
    }
}

async fn directory_playbooks_are_shared_by_every_tenant(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ops.yml"),
        "name: page-ops\nsteps:\n  - name: note\n    action: add_incident_note\n    params:\n      text: paged\n---\nname: broken\nsteps: []\n",
    )
    .unwrap();
    let mut settings = common::test_settings(&db);
    settings.playbooks_dir = Some(dir.path().to_owned());
    let app = common::spawn_with(db, settings).await;
    for tenant in ["dir-a", "dir-b"] {
        let (_, key) = app.tenant_with_key(tenant, &ALL).await;
        let list = playbooks(&app.channel)
            .list_playbooks(with_key(pb::ListPlaybooksRequest::default(), &key))
            .await
            .unwrap()
            .into_inner()
            .playbooks;
        let ops = list.iter().find(|p| p.name == "page-ops").expect("shared");
        assert_eq!(ops.origin, pb::PlaybookOrigin::Directory as i32);
        // The bad document was skipped; the built-in pack is still there.
        assert!(!list.iter().any(|p| p.name == "broken"));
        assert!(list.iter().any(|p| p.name == "contain-brute-force"));
        let inc = incident(&app.channel, &key, "Ops", "203.0.113.140", "").await;
        let run = start(&app.channel, &key, &ops.id, &inc).await.unwrap();
        let done = finished(&app.channel, &key, &run.id).await;
        assert_eq!(status(&done), pb::RunStatus::Succeeded, "{done:?}");
    }
}

crate::both_backends!(
    directory_playbooks_are_shared_by_every_tenant,
    playbooks_are_validated_versioned_and_listed,
    approvals_are_distinct_bound_and_exact,
    fifty_concurrent_approvals_execute_once,
    pending_runs_expire_on_time,
    runs_watch_snapshots_and_resumes,
    internal_notification_targets_are_refused,
    notifications_are_signed_with_the_tenant_secret,
    triggers_run_once_per_new_or_escalated_incident,
    step_effects_happen_once_per_run_and_step,
    decision_steps_ban_and_undo_records_who,
);
