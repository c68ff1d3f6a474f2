//! Playbooks against the real binary: a notification cut off by SIGKILL is
//! completed once by the restarted server; a brute force against the
//! README's server ends contained (ban on WatchDecisions, note, status,
//! one signed notification, no step done twice); `picket playbook apply`.

use picket::grpc::pb;
use picket::storage::Backend;

use crate::common::{self, ServerProcess, TestDb, key_for, tenant_with_key as tenant, with_key};
use crate::playbooks::{
    ALL, DEADLINE, Receiver, create, entries_of, finished, incident, next_change, playbook,
    playbooks, signed_by, start, status, step, watch,
};

async fn a_notification_cut_off_by_a_crash_is_completed_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let env = [
        ("PICKET_NOTIFY_ALLOW_CIDR", "127.0.0.0/8"),
        ("PICKET_PLAYBOOK_LEASE_SECONDS", "3"),
        ("PICKET_PLAYBOOK_POLL_MS", "100"),
    ];
    let mut server = ServerProcess::start(&db, &env);
    let ch = server.channel().await;
    let (_, key) = tenant(&ch, "crash-notify", &ALL).await;
    // Holds the first request open: the server dies after sending it and
    // before it can record the answer.
    let receiver = Receiver::start(true).await;
    let inc = incident(&ch, &key, "Crash", "203.0.113.130", "").await;
    let p = create(
        &ch,
        &key,
        playbook(
            "note-then-notify",
            vec![
                step(
                    "note",
                    pb::ActionKind::AddIncidentNote,
                    &[("text", "noted once")],
                ),
                step(
                    "notify",
                    pb::ActionKind::NotifyWebhook,
                    &[("url", &receiver.url()), ("message", "once")],
                ),
            ],
        ),
    )
    .await;
    let run = start(&ch, &key, &p.id, &inc).await.unwrap();
    receiver.wait_for(1).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    // The restarted server takes the run over once the lease runs out and
    // continues with the unfinished step (the note is done and recorded).
    let server = ServerProcess::start(&db, &env);
    let ch = server.channel().await;
    let done = finished(&ch, &key, &run.id).await;
    assert_eq!(status(&done), pb::RunStatus::Succeeded, "{done:?}");
    let note = &done.step_results[0];
    let notify = &done.step_results[1];
    assert_eq!(note.attempts, 1, "the note step was not repeated: {done:?}");
    assert_eq!(
        notify.attempts, 2,
        "the cut-off attempt and the retry: {done:?}"
    );
    assert_eq!(entries_of(&ch, &key, &inc, &run.id).await.len(), 1);
    let deliveries = receiver.wait_for(2).await;
    assert_eq!(deliveries.len(), 2);
    // Both carry the same key: a receiver applies the notification once.
    assert_eq!(receiver.effects().len(), 1, "{deliveries:?}");
    let secret = playbooks(&ch)
        .get_notification_settings(with_key(pb::GetNotificationSettingsRequest {}, &key))
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert!(deliveries.iter().all(|d| signed_by(d, &secret)));
}

async fn brute_force_against_the_readme_server_is_contained(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The README's server, allowed to notify a receiver on this machine.
    let server = ServerProcess::start(&db, &[("PICKET_NOTIFY_ALLOW_CIDR", "127.0.0.1/32")]);
    let ch = server.channel().await;
    let (tenant_id, analyst) = tenant(&ch, "contain-e2e", &ALL).await;
    let approver = key_for(&ch, &tenant_id, &[pb::Scope::Respond, pb::Scope::Read]).await;
    let receiver = Receiver::start(false).await;
    playbooks(&ch)
        .update_notification_settings(with_key(
            pb::UpdateNotificationSettingsRequest {
                url: receiver.url(),
            },
            &analyst,
        ))
        .await
        .unwrap();
    let mut enforcement = pb::enforcement_service_client::EnforcementServiceClient::new(ch.clone());
    let mut bans = enforcement
        .watch_decisions(with_key(
            pb::WatchDecisionsRequest {
                heartbeat_interval_seconds: 1,
                ..Default::default()
            },
            &analyst,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut inbox = watch(&ch, &approver, &[pb::RunStatus::PendingApproval], "").await;

    // The attack: failed logins for one account from one address.
    let ip = "198.51.100.77";
    let events = (0..8)
        .map(|i| crate::ingest::login(&format!("bf-{i}"), "victim@example.com", ip, false))
        .collect();
    pb::ingest_service_client::IngestServiceClient::new(ch.clone())
        .ingest(with_key(pb::IngestRequest { events }, &analyst))
        .await
        .unwrap();

    // The built-in contain-brute-force playbook asks for approval.
    let (change, _) = next_change(&mut inbox).await;
    let run = change.run.unwrap();
    assert_eq!(run.playbook_name, "contain-brute-force");
    assert!(run.automatic);
    assert_eq!(
        run.steps[0].params["ip"], ip,
        "the approver sees the resolved IP"
    );
    let done = crate::playbooks::approve(&ch, &approver, &run.id, &run.params_digest)
        .await
        .unwrap();
    assert_eq!(status(&done), pb::RunStatus::Approved);
    let done = finished(&ch, &analyst, &run.id).await;
    assert_eq!(status(&done), pb::RunStatus::Succeeded, "{done:?}");
    assert!(
        done.step_results.iter().all(|r| r.attempts == 1),
        "no step was done twice: {done:?}"
    );

    // The ban reaches a WatchDecisions subscriber.
    let banned = tokio::time::timeout(DEADLINE, async {
        loop {
            let item = bans.message().await.unwrap().expect("stream ended");
            if let Some(pb::watch_decisions_response::Item::Deltas(chunk)) = item.item
                && let Some(d) = chunk.deltas.iter().find_map(|d| d.decision.clone())
                && d.value == ip
            {
                return d;
            }
        }
    })
    .await
    .expect("no ban arrived");
    assert_eq!(banned.r#type, pb::DecisionType::Ban as i32);
    assert_eq!(banned.origin.unwrap().id, run.id);

    // The note and the status on the incident.
    let inc = done.incident_id.clone();
    let entries = entries_of(&ch, &analyst, &inc, &run.id).await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(entries[0].subject.contains(ip), "{entries:?}");
    let incident = crate::playbooks::incidents(&ch)
        .get_incident(with_key(
            pb::GetIncidentRequest {
                incident_id: inc.clone(),
            },
            &analyst,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    assert_eq!(incident.status, pb::IncidentStatus::Contained as i32);

    // One signed notification.
    let got = receiver.wait_for(1).await;
    let secret = playbooks(&ch)
        .get_notification_settings(with_key(pb::GetNotificationSettingsRequest {}, &analyst))
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert!(signed_by(&got[0], &secret));
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["incident"]["id"], inc.as_str());
    // Nothing more arrives: the decision list holds one ban for the address.
    let decisions = enforcement
        .list_decisions(with_key(pb::ListDecisionsRequest::default(), &analyst))
        .await
        .unwrap()
        .into_inner()
        .decisions;
    assert_eq!(decisions.iter().filter(|d| d.value == ip).count(), 1);
    assert_eq!(receiver.deliveries().len(), 1);
}

/// Runs `picket playbook apply` against `addr`; (success, stdout, stderr).
fn apply(addr: std::net::SocketAddr, key: &str, path: &std::path::Path) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
        .args(["playbook", "apply"])
        .arg(path)
        .args(["--server", &format!("http://{addr}")])
        .env("PICKET_API_KEY", key)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const FILE: &str = "\
name: page-on-call
description: Note and notify.
steps:
  - name: note
    action: add_incident_note
    params:
      text: \"seen {{entity.ip}}\"
";

async fn playbook_files_apply_idempotently(backend: Backend) {
    let app = common::spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("apply", &ALL).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("page.yml");
    std::fs::write(&file, FILE).unwrap();
    let addr = app.addr;
    let run = |p: std::path::PathBuf| {
        let key = key.clone();
        tokio::task::spawn_blocking(move || apply(addr, &key, &p))
    };
    let (ok, out, err) = run(dir.path().to_owned()).await.unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("created page-on-call (version 1"), "{out}");
    let (ok, out, _) = run(dir.path().to_owned()).await.unwrap();
    assert!(
        ok && out.starts_with("unchanged page-on-call (version 1"),
        "{out}"
    );
    std::fs::write(&file, FILE.replace("Note and notify.", "Note.")).unwrap();
    let (ok, out, _) = run(file.clone()).await.unwrap();
    assert!(
        ok && out.starts_with("updated page-on-call (version 2"),
        "{out}"
    );
    let listed = playbooks(&app.channel)
        .list_playbooks(with_key(pb::ListPlaybooksRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .playbooks;
    let mine = listed.iter().find(|p| p.name == "page-on-call").unwrap();
    assert_eq!((mine.description.as_str(), mine.version), ("Note.", 2));

    // A bad file: its line, and nothing applied.
    std::fs::write(
        dir.path().join("z-bad.yml"),
        "name: broken\nsteps:\n  - name: n\n    action: add_incident_note\n    params:\n      text: \"{{incident.owner}}\"\n",
    )
    .unwrap();
    std::fs::write(&file, FILE.replace("Note and notify.", "Changed again.")).unwrap();
    let (ok, out, err) = run(dir.path().to_owned()).await.unwrap();
    assert!(!ok, "{out}");
    assert!(err.contains("z-bad.yml:6: steps[0].params[text]"), "{err}");
    assert!(out.is_empty(), "{out}");
    let listed = playbooks(&app.channel)
        .list_playbooks(with_key(pb::ListPlaybooksRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .playbooks;
    assert_eq!(
        listed
            .iter()
            .find(|p| p.name == "page-on-call")
            .unwrap()
            .version,
        2
    );
    assert!(!listed.iter().any(|p| p.name == "broken"));
}

crate::both_backends!(
    a_notification_cut_off_by_a_crash_is_completed_once,
    brute_force_against_the_readme_server_is_contained,
    playbook_files_apply_idempotently,
);
