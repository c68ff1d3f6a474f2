//! Per-tenant rules through AdminService: validation with line numbers,
//! create, list, enable/disable, update, delete, and evaluation for that tenant only.

use chrono::Utc;
use picket::grpc::pb;
use picket::storage::Backend;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{self, TestApp, spawn_app, with_key};

const RULE_ID: &str = "0b7e4f0e-5a63-4a53-9d6c-3f1f0f6f2a11";

pub(crate) fn db_drop_rule(title: &str) -> String {
    format!(
        "title: {title}\nid: {RULE_ID}\nstatus: test\nlogsource:\n    product: picket\n    category: database\n\
         detection:\n    selection:\n        EventType: db.drop_table\n    condition: selection\nlevel: high\n\
         tags:\n    - attack.impact\n    - attack.t1485\n"
    )
}

fn admin(app: &TestApp) -> pb::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
    app.admin()
}

pub(crate) fn drop_event(key: &str) -> pb::Event {
    pb::Event {
        occurred_at: Some(picket::grpc::convert::timestamp(Utc::now())),
        event_type: "db.drop_table".into(),
        idempotency_key: key.into(),
        actor: "mallory".into(),
        action: "drop".into(),
        resource: "orders".into(),
        ..Default::default()
    }
}

async fn tenant_rules_validate_apply_and_stay_private(backend: Backend) {
    let app = spawn_app(backend).await;
    let scopes = [pb::Scope::Admin, pb::Scope::Ingest, pb::Scope::Read];
    let (_, key) = app.tenant_with_key("acme", &scopes).await;
    let (_, other) = app.tenant_with_key("other", &scopes).await;

    // Validation points at the bad line.
    let broken = "title: broken\nid: 11111111-2222-3333-4444-555555555555\nlogsource:\n    product: picket\ndetection:\n    selection:\n        EventType: x\n    condition: nonexistent_selection\n";
    let v = admin(&app)
        .validate_rule(with_key(
            pb::ValidateRuleRequest {
                sigma_yaml: broken.into(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert!(!v.errors.is_empty());
    let not_yaml = admin(&app)
        .validate_rule(with_key(
            pb::ValidateRuleRequest {
                sigma_yaml: "title: [unclosed\n  id: x".into(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !not_yaml.valid && not_yaml.errors.iter().any(|e| e.line > 0),
        "{:?}",
        not_yaml.errors
    );
    let err = admin(&app)
        .create_rule(with_key(
            pb::CreateRuleRequest {
                tenant_id: String::new(),
                sigma_yaml: broken.into(),
                enabled: true,
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "sigma_yaml"
    );

    // A valid rule is stored and listed beside the built-in pack.
    let rule = admin(&app)
        .create_rule(with_key(
            pb::CreateRuleRequest {
                tenant_id: String::new(),
                sigma_yaml: db_drop_rule("Table dropped"),
                enabled: true,
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert_eq!(rule.id, RULE_ID);
    assert_eq!(rule.origin, pb::RuleOrigin::Tenant as i32);
    let listed = admin(&app)
        .list_rules(with_key(pb::ListRulesRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert!(listed.iter().any(|r| r.id == RULE_ID));
    assert!(
        listed
            .iter()
            .filter(|r| r.origin == pb::RuleOrigin::Builtin as i32)
            .count()
            >= 5
    );
    let dup = admin(&app)
        .create_rule(with_key(
            pb::CreateRuleRequest {
                tenant_id: String::new(),
                sigma_yaml: db_drop_rule("Again"),
                enabled: true,
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    // The other tenant does not see it.
    let theirs = admin(&app)
        .get_rule(with_key(
            pb::GetRuleRequest {
                tenant_id: String::new(),
                rule_id: RULE_ID.into(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), Code::NotFound);

    // It fires for this tenant only.
    let mut watch = pb::alert_service_client::AlertServiceClient::new(app.channel.clone())
        .watch_alerts(with_key(pb::WatchAlertsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner();
    for (k, ev) in [(&other, "o1"), (&key, "a1")] {
        app.ingest()
            .ingest(with_key(
                pb::IngestRequest {
                    events: vec![drop_event(ev)],
                },
                k,
            ))
            .await
            .unwrap();
    }
    let alert = loop {
        let item = watch.message().await.unwrap().unwrap();
        if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item {
            break a;
        }
    };
    assert_eq!(alert.source_name, RULE_ID);
    assert_eq!(alert.title, "Table dropped");
    let other_alerts = pb::alert_service_client::AlertServiceClient::new(app.channel.clone())
        .list_alerts(with_key(pb::ListAlertsRequest::default(), &other))
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert!(
        other_alerts.iter().all(|a| a.source_name != RULE_ID),
        "another tenant's rule fired"
    );

    // Update keeps the id; disable; built-in rules can be disabled, not deleted.
    let updated = admin(&app)
        .update_rule(with_key(
            pb::UpdateRuleRequest {
                tenant_id: String::new(),
                rule_id: RULE_ID.into(),
                sigma_yaml: db_drop_rule("Table dropped (v2)"),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert_eq!(updated.title, "Table dropped (v2)");
    let builtin = listed
        .iter()
        .find(|r| r.origin == pb::RuleOrigin::Builtin as i32)
        .unwrap();
    let off = admin(&app)
        .set_rule_enabled(with_key(
            pb::SetRuleEnabledRequest {
                tenant_id: String::new(),
                rule_id: builtin.id.clone(),
                enabled: false,
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert!(!off.enabled);
    let err = admin(&app)
        .delete_rule(with_key(
            pb::DeleteRuleRequest {
                tenant_id: String::new(),
                rule_id: builtin.id.clone(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    admin(&app)
        .delete_rule(with_key(
            pb::DeleteRuleRequest {
                tenant_id: String::new(),
                rule_id: RULE_ID.into(),
            },
            &key,
        ))
        .await
        .unwrap();
    let err = admin(&app)
        .get_rule(with_key(
            pb::GetRuleRequest {
                tenant_id: String::new(),
                rule_id: RULE_ID.into(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

crate::both_backends!(tenant_rules_validate_apply_and_stay_private);

fn dir_rule(id: &str, title: &str, event_type: &str) -> String {
    format!(
        "title: {title}\nid: {id}\nstatus: test\nlogsource:\n    product: picket\n    category: database\n\
         detection:\n    selection:\n        EventType: {event_type}\n    condition: selection\nlevel: medium\n"
    )
}

#[tokio::test]
async fn rules_directory_reloads_on_change_and_keeps_rules_on_bad_files() {
    use picket::detect::{Evaluator, EvaluatorConfig, SharedRules};
    use picket::pipeline::{DetectionPipeline, PipelineConfig};
    let db = common::TestDb::new(Backend::Sqlite).await;
    let store = picket::storage::connect(&db.url, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = "5d2c1f0e-0000-4000-8000-00000000000a";
    let b = "5d2c1f0e-0000-4000-8000-00000000000b";
    std::fs::write(
        dir.path().join("a.yml"),
        dir_rule(a, "Dir rule A", "db.drop_table"),
    )
    .unwrap();
    let initial = picket::pipeline::load_rules(Some(dir.path())).unwrap();
    assert!(initial.get(a).is_some());
    let shared = SharedRules::new(initial.clone());
    let mut pipeline = DetectionPipeline::new(
        store,
        Evaluator::new(initial, EvaluatorConfig::default()),
        std::sync::Arc::new(picket::ingest::signal::Signal::new()),
        PipelineConfig::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .with_rules_dir(Some(dir.path().to_path_buf()), shared.clone());
    assert!(
        !pipeline.reload_rules_dir_if_changed(),
        "nothing changed yet"
    );

    std::fs::write(
        dir.path().join("b.yml"),
        dir_rule(b, "Dir rule B", "db.truncate"),
    )
    .unwrap();
    assert!(pipeline.reload_rules_dir_if_changed());
    assert!(shared.current().get(a).is_some() && shared.current().get(b).is_some());

    // A broken file is rejected on its own; the other rules stay in force.
    std::fs::write(dir.path().join("c.yml"), "title: [broken\n").unwrap();
    pipeline.reload_rules_dir_if_changed();
    assert!(shared.current().get(a).is_some() && shared.current().get(b).is_some());
    // Removing a file removes its rule.
    std::fs::remove_file(dir.path().join("a.yml")).unwrap();
    assert!(pipeline.reload_rules_dir_if_changed());
    assert!(shared.current().get(a).is_none() && shared.current().get(b).is_some());
}

/// Item 12 of issue 11: the README's ValidateRule example (no `id`, an
/// unknown identifier in `condition:`) used to report line 1 for both errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_rule_points_at_the_condition_line() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_, key) = app.tenant_with_key("acme", &[pb::Scope::Admin]).await;
    // Verbatim from the README.
    let readme = "title: x\nlogsource: {product: picket}\ndetection:\n  sel: {EventType: db.drop_table}\n  condition: nope\n";
    let v = admin(&app)
        .validate_rule(with_key(
            pb::ValidateRuleRequest {
                sigma_yaml: readme.into(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    let at: Vec<(u32, u32)> = v.errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(at, vec![(1, 0), (5, 14)], "{:#?}", v.errors);
    assert!(v.errors[1].message.contains("nope"), "{:?}", v.errors);
}
