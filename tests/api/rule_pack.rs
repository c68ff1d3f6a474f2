//! The default rule pack through the real server, on both backends: each
//! rule's positive case raises its alert and its negative case does not.
//! (Every rule also has unit tests in src/detect/pack_tests.rs; the
//! history-hungry behavioural detectors are covered there and by `picket simulate`.)

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use picket::grpc::pb;
use picket::storage::Backend;

use crate::common::{spawn_app, with_key};

fn ev(key: &str, event_type: &str, actor: &str, ip: &str) -> pb::Event {
    pb::Event {
        occurred_at: Some(picket::grpc::convert::timestamp(Utc::now())),
        event_type: event_type.into(),
        idempotency_key: key.into(),
        actor: actor.into(),
        source_ip: ip.into(),
        outcome: pb::Outcome::Success as i32,
        ..Default::default()
    }
}

fn login(key: &str, actor: &str, ip: &str, ok: bool) -> pb::Event {
    let mut e = ev(key, "user.login", actor, ip);
    e.action = "login".into();
    e.outcome = if ok {
        pb::Outcome::Success
    } else {
        pb::Outcome::Failure
    } as i32;
    e.auth = Some(pb::AuthDetails {
        method: "password".into(),
        ..Default::default()
    });
    e
}

fn grant(key: &str, actor: &str, privilege: &str, target: &str) -> pb::Event {
    let mut e = ev(key, "role.grant", actor, "");
    e.action = "grant".into();
    e.change = Some(pb::ChangeDetails {
        privilege: privilege.into(),
        target_actor: target.into(),
        ..Default::default()
    });
    e
}

/// (rule title, positive events, negative events, entity value that must not be named by that rule's alerts)
fn cases() -> Vec<(&'static str, Vec<pb::Event>, Vec<pb::Event>, &'static str)> {
    let mut c = Vec::new();
    c.push((
        "Authentication failure burst from one source IP",
        (0..6)
            .map(|i| login(&format!("ip+{i}"), "ipuser", "192.0.2.10", false))
            .collect(),
        (0..5)
            .map(|i| login(&format!("ip-{i}"), "ipuser2", "192.0.2.11", false))
            .collect(),
        "192.0.2.11",
    ));
    c.push((
        "Authentication failure burst for one account",
        (0..6)
            .map(|i| {
                login(
                    &format!("ac+{i}"),
                    "acct-pos",
                    &format!("198.18.0.{i}"),
                    false,
                )
            })
            .collect(),
        (0..5)
            .map(|i| {
                login(
                    &format!("ac-{i}"),
                    "acct-neg",
                    &format!("198.18.1.{i}"),
                    false,
                )
            })
            .collect(),
        "acct-neg",
    ));
    c.push((
        "Password spraying from one source IP",
        (0..5)
            .map(|i| {
                login(
                    &format!("sp+{i}"),
                    &format!("spray{i}"),
                    "192.0.2.20",
                    false,
                )
            })
            .collect(),
        (0..4)
            .map(|i| {
                login(
                    &format!("sp-{i}"),
                    &format!("nospray{i}"),
                    "192.0.2.21",
                    false,
                )
            })
            .collect(),
        "192.0.2.21",
    ));
    let mut after = (0..6)
        .map(|i| {
            login(
                &format!("sa+{i}"),
                "succ-pos",
                &format!("198.18.2.{i}"),
                false,
            )
        })
        .collect::<Vec<_>>();
    after.push(login("sa+ok", "succ-pos", "198.18.2.9", true));
    let mut few = (0..3)
        .map(|i| {
            login(
                &format!("sa-{i}"),
                "succ-neg",
                &format!("198.18.3.{i}"),
                false,
            )
        })
        .collect::<Vec<_>>();
    few.push(login("sa-ok", "succ-neg", "198.18.3.9", true));
    c.push((
        "Successful authentication after a failure burst",
        after,
        few,
        "succ-neg",
    ));
    let mut fw = ev("fw+", "firewall.rule_change", "netops", "");
    fw.action = "update".into();
    fw.resource = "allow-ssh".into();
    let mut block = ev("fw-", "firewall.block", "netops-neg", "");
    block.action = "deny".into();
    c.push(("Firewall rule changed", vec![fw], vec![block], "netops-neg"));
    c.push((
        "Privileged role or permission granted",
        vec![grant("pg+", "alice-adm", "tenant-admin", "mallory")],
        vec![grant("pg-", "bob-adm", "viewer", "carol")],
        "bob-adm",
    ));
    c.push((
        "Privilege granted to self",
        vec![grant("sg+", "selfie", "admin", "selfie")],
        vec![grant("sg-", "giver", "admin", "receiver")],
        "giver",
    ));
    let mut admin_bad = ev("na+", "admin.user.delete", "support-1", "");
    admin_bad.action = "delete".into();
    admin_bad
        .attributes
        .insert("actor_role".into(), "support".into());
    let mut admin_ok = ev("na-", "admin.user.delete", "real-admin", "");
    admin_ok.action = "delete".into();
    admin_ok
        .attributes
        .insert("actor_role".into(), "admin".into());
    c.push((
        "Admin action by a non-admin actor",
        vec![admin_bad],
        vec![admin_ok],
        "real-admin",
    ));
    let mut del = ev("td+", "tenant.delete", "ops-del", "");
    del.action = "delete".into();
    del.resource = "acme-old".into();
    let mut create = ev("td-", "tenant.create", "ops-create", "");
    create.action = "create".into();
    c.push(("Tenant deleted", vec![del], vec![create], "ops-create"));
    let throttled = |key: String, actor: &str| {
        let mut e = ev(&key, "ratelimit.exceeded", actor, "");
        e.action = "throttle".into();
        e.outcome = pb::Outcome::Failure as i32;
        e.quota = Some(pb::QuotaDetails {
            limit_name: "requests_per_minute".into(),
            limit: 600.0,
            observed: 900.0,
            throttled: true,
        });
        e
    };
    c.push((
        "Repeated API rate-limit violations",
        (0..10)
            .map(|i| throttled(format!("rl+{i}"), "noisy-client"))
            .collect(),
        (0..3)
            .map(|i| throttled(format!("rl-{i}"), "calm-client"))
            .collect(),
        "calm-client",
    ));
    let mut quota = ev("qt+", "quota.exceeded", "storage-user", "");
    quota.action = "exceeded".into();
    quota.quota = Some(pb::QuotaDetails {
        limit_name: "storage_bytes".into(),
        limit: 1e9,
        observed: 2e9,
        throttled: false,
    });
    let mut usage = ev("qt-", "quota.usage", "storage-ok", "");
    usage.action = "report".into();
    usage.quota = Some(pb::QuotaDetails {
        limit_name: "storage_bytes".into(),
        limit: 1e9,
        observed: 1e8,
        throttled: false,
    });
    c.push((
        "Quota threshold exceeded",
        vec![quota],
        vec![usage],
        "storage-ok",
    ));
    let out = |key: &str, actor: &str, bytes: u64| {
        let mut e = ev(key, "http_request", actor, "");
        e.action = "GET".into();
        e.http = Some(pb::HttpDetails {
            method: "GET".into(),
            path: "/export".into(),
            status_code: 200,
            bytes_out: bytes,
            ..Default::default()
        });
        e
    };
    c.push((
        "Data exfiltration volume",
        vec![out("ex+", "hoarder", 600 << 20)],
        vec![out("ex-", "reader", 1 << 20)],
        "reader",
    ));
    c
}

async fn default_rules_fire_on_positives_and_not_on_negatives(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("pack", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let mut alerts = pb::alert_service_client::AlertServiceClient::new(app.channel.clone());
    let mut watch = alerts
        .watch_alerts(with_key(pb::WatchAlertsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner();
    let cases = cases();
    for (_, pos, neg, _) in &cases {
        // Negatives first: if they raised anything, it would be listed before the positives' alerts.
        for batch in [neg, pos] {
            let r = app
                .ingest()
                .ingest(with_key(
                    pb::IngestRequest {
                        events: batch.clone(),
                    },
                    &key,
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.rejected, 0, "{:?}", r.receipts);
        }
    }
    let wanted: HashSet<&str> = cases.iter().map(|c| c.0).collect();
    let mut seen: HashMap<String, pb::Alert> = HashMap::new();
    let wait = async {
        while !wanted.iter().all(|t| seen.contains_key(*t)) {
            let item = watch.message().await.unwrap().expect("watch ended");
            if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item {
                seen.insert(a.title.clone(), a);
            }
        }
    };
    // Bounded: a rule that never fires fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "positive cases that raised nothing: {:?}",
                wanted
                    .iter()
                    .filter(|t| !seen.contains_key(**t))
                    .collect::<Vec<_>>()
            )
        });
    let all = alerts
        .list_alerts(with_key(
            pb::ListAlertsRequest {
                page_size: 1000,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .alerts;
    for (title, _, negative, negative_entity) in &cases {
        let own_negatives: HashSet<&str> = negative
            .iter()
            .map(|e| e.idempotency_key.as_str())
            .collect();
        let fired: Vec<&pb::Alert> = all.iter().filter(|a| a.title == *title).collect();
        assert!(!fired.is_empty(), "\"{title}\" is missing from ListAlerts");
        for a in fired {
            let negatives: Vec<String> = a
                .evidence
                .iter()
                .filter_map(|e| e.snapshot.as_ref())
                .filter(|s| own_negatives.contains(s.idempotency_key.as_str()))
                .map(|s| s.idempotency_key.clone())
                .collect();
            assert!(
                negatives.is_empty(),
                "\"{title}\" fired on its negative case ({negative_entity}): {negatives:?}"
            );
        }
    }
}

crate::both_backends!(default_rules_fire_on_positives_and_not_on_negatives);
