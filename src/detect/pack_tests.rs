//! Tests of the default rule pack through the [`Evaluator`]: a positive and a
//! negative case per rule, window edges, tenant isolation, per-tenant rules,
//! bounds and state carried over rule changes.

use std::collections::{BTreeMap, HashSet};

use uuid::Uuid;

use crate::detect::behavior::{EXFILTRATION_ID, UNUSUAL_HOUR_ID, VPN_NEW_NETWORK_ID};
use crate::detect::testing::{at, event, tenant};
use crate::detect::{
    Detection, DetectionKind, Entity, EntityKind, Evaluator, EvaluatorConfig, MAX_EVIDENCE,
    RuleOrigin, RuleSet, RuleSource, TenantRules,
};
use crate::domain::event::{ChangeDetails, HttpDetails, NewEvent, Outcome, QuotaDetails};
use crate::domain::{Severity, TenantId};

const AUTH_FAILURE: &str = "3f01a1fb-b5cc-447e-8fcc-863ee0feb6bf";
const BRUTE_IP: &str = "ae97f06f-3826-4a95-b282-0775102ab7b4";
const BRUTE_ACTOR: &str = "6978ad3a-1bc2-4834-8b4b-92f09f0ee151";
const SPRAY: &str = "54da9793-23e9-4018-9c70-399273bccd56";
const SUCCESS_AFTER: &str = "8ca3c771-c599-43e4-9c7f-a55935e954df";
const PRIV_GRANT: &str = "434f384d-8cbf-4ddd-ab91-c7753cf0dfb6";
const SELF_GRANT: &str = "3977764f-7a3c-4986-9ec5-a5ee1105123d";
const ADMIN_NON_ADMIN: &str = "4bb6816d-71e4-484e-81c5-793a7685d295";
const FIREWALL: &str = "8ce09abe-4ada-4fe6-9ce9-d73a81bddbff";
const TENANT_DELETE: &str = "2c7d0c04-9e93-45a4-852b-47885acc7439";
const RATE_LIMIT: &str = "275fc162-a600-4dfd-b3a3-f13927c44352";
const QUOTA: &str = "ec94701f-cb07-4107-bb75-7bbf4c2f0c05";

fn evaluator() -> Evaluator {
    Evaluator::new(RuleSet::builtin().clone(), EvaluatorConfig::default())
}

fn ids(ds: &[Detection]) -> Vec<&str> {
    let mut v: Vec<&str> = ds.iter().map(|d| d.rule_id.as_str()).collect();
    v.sort();
    v
}

fn only<'a>(ds: &'a [Detection], id: &str) -> Vec<&'a Detection> {
    ds.iter().filter(|d| d.rule_id == id).collect()
}

fn login(actor: &str, ip: &str, outcome: Outcome, t: i64) -> NewEvent {
    let mut e = event("user.login");
    e.actor = actor.into();
    e.source_ip = Some(ip.parse().unwrap());
    e.outcome = outcome;
    e.occurred_at = at(t);
    e
}

fn fail(actor: &str, ip: &str, t: i64) -> NewEvent {
    login(actor, ip, Outcome::Failure, t)
}

/// Feeds events to the fixed tenant and returns every detection, in order.
fn run(ev: &mut Evaluator, events: impl IntoIterator<Item = NewEvent>) -> Vec<Detection> {
    events
        .into_iter()
        .flat_map(|e| ev.observe(tenant(), &e))
        .collect()
}

// ---- failed-authentication bursts ----------------------------------------

#[test]
fn burst_per_source_ip_fires_on_the_sixth_failure() {
    let mut ev = evaluator();
    let first = run(
        &mut ev,
        (0..5).map(|i| fail("alice", "203.0.113.9", i * 10)),
    );
    assert!(only(&first, BRUTE_IP).is_empty(), "5 is not more than 5");
    assert!(only(&first, AUTH_FAILURE).is_empty(), "base rule is silent");
    let sixth = ev.observe(tenant(), &fail("alice", "203.0.113.9", 60));
    let d = only(&sixth, BRUTE_IP);
    assert_eq!(d.len(), 1, "{sixth:#?}");
    let d = d[0];
    assert_eq!(d.kind, DetectionKind::Correlation);
    assert_eq!(d.severity, Severity::High);
    assert_eq!(d.category, "credential_access");
    assert_eq!(d.attack_techniques, vec!["T1110", "T1110.001"]);
    assert_eq!(d.entities, vec![Entity::new(EntityKind::Ip, "203.0.113.9")]);
    assert_eq!(d.evidence.len(), 6);
    assert_eq!(d.first_seen, at(0));
    assert_eq!(d.last_seen, at(60));
    assert!(d.summary.contains("6 matching events"), "{}", d.summary);
    assert!(d.summary.contains("SourceIp=203.0.113.9"), "{}", d.summary);
}

#[test]
fn burst_per_source_ip_ignores_failures_spread_over_ips() {
    let mut ev = evaluator();
    let out = run(
        &mut ev,
        (0..6).map(|i| fail("alice", &format!("203.0.113.{i}"), i)),
    );
    assert!(only(&out, BRUTE_IP).is_empty());
    // …but they are one account's failures.
    assert_eq!(only(&out, BRUTE_ACTOR).len(), 1);
}

#[test]
fn burst_per_actor_fires_and_needs_more_than_five() {
    let mut ev = evaluator();
    let five = run(
        &mut ev,
        (0..5).map(|i| fail("bob", &format!("198.51.100.{i}"), i)),
    );
    assert!(only(&five, BRUTE_ACTOR).is_empty());
    let sixth = ev.observe(tenant(), &fail("bob", "198.51.100.77", 10));
    let d = only(&sixth, BRUTE_ACTOR);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].entities, vec![Entity::new(EntityKind::Actor, "bob")]);
    // Other actors' failures do not count for bob.
    let mut ev = evaluator();
    let out = run(
        &mut ev,
        (0..6).map(|i| fail(&format!("u{i}"), "192.0.2.1", i)),
    );
    assert!(only(&out, BRUTE_ACTOR).is_empty());
}

#[test]
fn window_edges_are_inclusive_to_the_second() {
    // Five failures at t=0, the sixth exactly 5 minutes later: in the window.
    let mut ev = evaluator();
    run(&mut ev, (0..5).map(|_| fail("carol", "192.0.2.50", 0)));
    let at_edge = ev.observe(tenant(), &fail("carol", "192.0.2.50", 300));
    assert_eq!(only(&at_edge, BRUTE_IP).len(), 1, "t-300s is in the window");

    // One second later the first five have left it.
    let mut ev = evaluator();
    run(&mut ev, (0..5).map(|_| fail("carol", "192.0.2.50", 0)));
    let past_edge = ev.observe(tenant(), &fail("carol", "192.0.2.50", 301));
    assert!(only(&past_edge, BRUTE_IP).is_empty(), "t-301s is out");
}

#[test]
fn a_firing_correlation_is_suppressed_then_fires_again() {
    let mut ev = evaluator();
    let out = run(&mut ev, (0..20).map(|i| fail("dan", "192.0.2.60", i)));
    let fired = only(&out, BRUTE_IP);
    assert_eq!(fired.len(), 1, "suppressed for 5 minutes after firing");
    let later = run(&mut ev, (0..6).map(|i| fail("dan", "192.0.2.60", 400 + i)));
    let again = only(&later, BRUTE_IP);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].fingerprint, fired[0].fingerprint, "stable");
}

#[test]
fn evidence_is_capped() {
    let mut ev = Evaluator::new(
        RuleSet::builtin().clone(),
        EvaluatorConfig {
            suppress: chrono::Duration::zero(),
            ..Default::default()
        },
    );
    let out = run(&mut ev, (0..150).map(|i| fail("erin", "192.0.2.70", i)));
    let last = only(&out, BRUTE_IP).pop().unwrap();
    assert_eq!(last.evidence.len(), MAX_EVIDENCE);
    assert_eq!(last.last_seen, at(149));
}

// ---- password spraying ---------------------------------------------------

#[test]
fn spraying_fires_on_the_fifth_distinct_account() {
    let mut ev = evaluator();
    let four = run(
        &mut ev,
        (0..4).map(|i| fail(&format!("user{i}"), "203.0.113.66", i * 60)),
    );
    assert!(only(&four, SPRAY).is_empty());
    let fifth = ev.observe(tenant(), &fail("user4", "203.0.113.66", 540));
    let d = only(&fifth, SPRAY);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].attack_techniques, vec!["T1110.003"]);
    assert!(
        d[0].summary.contains("5 distinct Actor values"),
        "{}",
        d[0].summary
    );
}

#[test]
fn spraying_needs_distinct_accounts_within_ten_minutes() {
    let mut ev = evaluator();
    // Many failures but only 4 accounts.
    let out = run(
        &mut ev,
        (0..12).map(|i| fail(&format!("user{}", i % 4), "203.0.113.67", i)),
    );
    assert!(only(&out, SPRAY).is_empty());
    // 5 accounts spread over 11 minutes.
    let mut ev = evaluator();
    let out = run(
        &mut ev,
        (0..5).map(|i| fail(&format!("user{i}"), "203.0.113.68", i * 165)),
    );
    assert!(only(&out, SPRAY).is_empty());
}

// ---- success after a burst -----------------------------------------------

#[test]
fn success_after_a_burst_fires() {
    let mut ev = evaluator();
    run(&mut ev, (0..6).map(|i| fail("frank", "198.51.100.9", i)));
    let out = ev.observe(
        tenant(),
        &login("frank", "198.51.100.9", Outcome::Success, 120),
    );
    let d = only(&out, SUCCESS_AFTER);
    assert_eq!(d.len(), 1, "{out:#?}");
    assert_eq!(d[0].severity, Severity::Critical);
    assert_eq!(d[0].entities, vec![Entity::new(EntityKind::Actor, "frank")]);
    assert!(d[0].attack_techniques.contains(&"T1078".to_string()));
    // A single success raises nothing by itself.
    let mut ev = evaluator();
    assert!(
        ev.observe(tenant(), &login("x", "192.0.2.1", Outcome::Success, 0))
            .is_empty()
    );
}

#[test]
fn success_after_too_few_failures_or_for_another_account_is_quiet() {
    let mut ev = evaluator();
    run(&mut ev, (0..5).map(|i| fail("gina", "198.51.100.10", i)));
    let out = ev.observe(
        tenant(),
        &login("gina", "198.51.100.10", Outcome::Success, 60),
    );
    assert!(only(&out, SUCCESS_AFTER).is_empty());

    let mut ev = evaluator();
    run(&mut ev, (0..6).map(|i| fail("hank", "198.51.100.11", i)));
    let out = ev.observe(
        tenant(),
        &login("ivy", "198.51.100.11", Outcome::Success, 60),
    );
    assert!(only(&out, SUCCESS_AFTER).is_empty());

    // A success before the burst is not "after" it.
    let mut ev = evaluator();
    ev.observe(
        tenant(),
        &login("jack", "198.51.100.12", Outcome::Success, 0),
    );
    let out = run(
        &mut ev,
        (0..6).map(|i| fail("jack", "198.51.100.12", 10 + i)),
    );
    assert!(only(&out, SUCCESS_AFTER).is_empty());
}

// ---- single-event rules --------------------------------------------------

fn change(event_type: &str, action: &str, actor: &str, change: ChangeDetails) -> NewEvent {
    let mut e = event(event_type);
    e.actor = actor.into();
    e.action = action.into();
    e.outcome = Outcome::Success;
    e.details.change = Some(change);
    e
}

#[test]
fn firewall_rule_changes_fire() {
    let mut ev = evaluator();
    let mut e = event("firewall.rule_change");
    e.actor = "netops".into();
    e.action = "update".into();
    e.resource = "allow-ssh".into();
    let out = ev.observe(tenant(), &e);
    assert_eq!(ids(&out), vec![FIREWALL]);
    let d = &out[0];
    assert_eq!(d.kind, DetectionKind::Rule);
    assert_eq!(d.severity, Severity::Medium);
    assert_eq!(d.category, "defense_evasion");
    assert_eq!(d.attack_techniques, vec!["T1562.004"]);
    assert_eq!(d.evidence, vec![e.id]);
    assert!(d.summary.contains("allow-ssh"), "{}", d.summary);
}

#[test]
fn firewall_traffic_and_config_changes_do_not() {
    let mut ev = evaluator();
    let mut block = event("firewall.block");
    block.action = "deny".into();
    assert!(ev.observe(tenant(), &block).is_empty());
    let mut cfg = event("config.rule_change");
    cfg.action = "update".into();
    assert!(ev.observe(tenant(), &cfg).is_empty(), "category config");
}

#[test]
fn privileged_grants_fire() {
    let mut ev = evaluator();
    let e = change(
        "role.grant",
        "grant",
        "alice",
        ChangeDetails {
            privilege: "tenant-admin".into(),
            target_actor: "mallory".into(),
            ..Default::default()
        },
    );
    let out = ev.observe(tenant(), &e);
    assert_eq!(ids(&out), vec![PRIV_GRANT]);
    assert_eq!(out[0].category, "privilege_escalation");
    assert_eq!(out[0].attack_techniques, vec!["T1098", "T1098.003"]);
}

#[test]
fn unprivileged_or_failed_grants_do_not() {
    let mut ev = evaluator();
    let viewer = change(
        "role.grant",
        "grant",
        "alice",
        ChangeDetails {
            privilege: "viewer".into(),
            target_actor: "bob".into(),
            ..Default::default()
        },
    );
    assert!(ev.observe(tenant(), &viewer).is_empty());
    let mut failed = change(
        "role.grant",
        "grant",
        "alice",
        ChangeDetails {
            privilege: "admin".into(),
            target_actor: "bob".into(),
            ..Default::default()
        },
    );
    failed.outcome = Outcome::Failure;
    assert!(ev.observe(tenant(), &failed).is_empty());
}

#[test]
fn self_grants_fire() {
    let mut ev = evaluator();
    let e = change(
        "permission.grant",
        "grant",
        "mallory",
        ChangeDetails {
            privilege: "billing:read".into(),
            target_actor: "mallory".into(),
            ..Default::default()
        },
    );
    let out = ev.observe(tenant(), &e);
    assert_eq!(ids(&out), vec![SELF_GRANT]);
    assert_eq!(out[0].severity, Severity::Critical);
}

#[test]
fn grants_to_others_are_not_self_grants() {
    let mut ev = evaluator();
    let e = change(
        "permission.grant",
        "grant",
        "alice",
        ChangeDetails {
            privilege: "billing:read".into(),
            target_actor: "bob".into(),
            ..Default::default()
        },
    );
    assert!(only(&ev.observe(tenant(), &e), SELF_GRANT).is_empty());
}

fn admin_call(role: Option<&str>, path: &str) -> NewEvent {
    let mut e = event("http_request");
    e.actor = "dev1".into();
    e.outcome = Outcome::Success;
    e.details.http = Some(HttpDetails {
        method: "POST".into(),
        path: path.into(),
        status_code: 200,
        ..Default::default()
    });
    if let Some(r) = role {
        e.details.attributes = BTreeMap::from([("actor_role".into(), r.into())]);
    }
    e
}

#[test]
fn admin_actions_by_non_admins_fire() {
    let mut ev = evaluator();
    let out = ev.observe(tenant(), &admin_call(Some("developer"), "/admin/users"));
    assert_eq!(ids(&out), vec![ADMIN_NON_ADMIN]);
    let mut e = event("admin.user.delete");
    e.actor = "dev2".into();
    e.details.attributes = BTreeMap::from([("actor_role".into(), "support".into())]);
    assert_eq!(ids(&ev.observe(tenant(), &e)), vec![ADMIN_NON_ADMIN]);
}

#[test]
fn admin_actions_by_admins_or_unknown_roles_do_not() {
    let mut ev = evaluator();
    assert!(
        ev.observe(tenant(), &admin_call(Some("admin"), "/admin/users"))
            .is_empty()
    );
    assert!(
        ev.observe(tenant(), &admin_call(None, "/admin/users"))
            .is_empty()
    );
    assert!(
        ev.observe(tenant(), &admin_call(Some("developer"), "/api/users"))
            .is_empty()
    );
    let mut denied = admin_call(Some("developer"), "/admin/users");
    denied.outcome = Outcome::Failure;
    assert!(ev.observe(tenant(), &denied).is_empty());
}

#[test]
fn tenant_deletion_fires() {
    let mut ev = evaluator();
    let mut e = event("tenant.delete");
    e.actor = "ops".into();
    e.resource = "acme".into();
    let out = ev.observe(tenant(), &e);
    assert_eq!(ids(&out), vec![TENANT_DELETE]);
    assert_eq!(out[0].attack_techniques, vec!["T1485"]);
    assert!(
        out[0]
            .entities
            .contains(&Entity::new(EntityKind::Resource, "acme"))
    );
}

#[test]
fn other_tenant_events_do_not() {
    let mut ev = evaluator();
    let mut e = event("tenant.create");
    e.action = "create".into();
    assert!(ev.observe(tenant(), &e).is_empty());
    let mut e = event("user.delete");
    e.action = "delete".into();
    assert!(ev.observe(tenant(), &e).is_empty(), "category account");
}

fn throttled(actor: &str, t: i64) -> NewEvent {
    let mut e = event("ratelimit.exceeded");
    e.actor = actor.into();
    e.occurred_at = at(t);
    e.details.quota = Some(QuotaDetails {
        limit_name: "requests_per_minute".into(),
        limit: 600.0,
        observed: 900.0,
        throttled: true,
    });
    e
}

#[test]
fn repeated_rate_limit_violations_fire() {
    let mut ev = evaluator();
    let nine = run(&mut ev, (0..9).map(|i| throttled("svc:batch", i * 20)));
    assert!(nine.is_empty(), "{nine:#?}");
    let tenth = ev.observe(tenant(), &throttled("svc:batch", 200));
    assert_eq!(ids(&tenth), vec![RATE_LIMIT]);
    assert_eq!(tenth[0].attack_techniques, vec!["T1499.003"]);
}

#[test]
fn sparse_rate_limit_violations_and_unthrottled_quota_events_do_not() {
    let mut ev = evaluator();
    // Ten violations over 10 minutes: never ten within 5.
    let out = run(&mut ev, (0..10).map(|i| throttled("svc:slow", i * 60)));
    assert!(out.is_empty());
    let mut usage = throttled("svc:fine", 0);
    usage.event_type = "quota.usage".into();
    usage.details.quota.as_mut().unwrap().throttled = false;
    let out = run(&mut ev, (0..12).map(|_| usage.clone()));
    assert!(out.is_empty());
}

#[test]
fn quota_threshold_breaches_fire() {
    let mut ev = evaluator();
    let mut e = event("quota.exceeded");
    e.actor = "acme-admin".into();
    e.details.quota = Some(QuotaDetails {
        limit_name: "storage_gb".into(),
        limit: 100.0,
        observed: 120.0,
        throttled: false,
    });
    let out = ev.observe(tenant(), &e);
    assert_eq!(ids(&out), vec![QUOTA]);
    assert_eq!(out[0].attack_techniques, vec!["T1496"]);
}

#[test]
fn quota_usage_and_rate_limits_are_not_quota_breaches() {
    let mut ev = evaluator();
    let mut e = event("quota.usage");
    e.details.quota = Some(QuotaDetails::default());
    assert!(ev.observe(tenant(), &e).is_empty());
    assert!(only(&ev.observe(tenant(), &throttled("a", 0)), QUOTA).is_empty());
}

// ---- behavioural detectors through the evaluator --------------------------

#[test]
fn behavioural_detectors_report_through_the_evaluator() {
    let mut ev = evaluator();
    let vpn = |ip: &str, t: i64| {
        let mut e = event("vpn.connect");
        e.actor = "kate".into();
        e.outcome = Outcome::Success;
        e.source_ip = Some(ip.parse().unwrap());
        e.occurred_at = at(t);
        e
    };
    let out = run(&mut ev, (0..6).map(|i| vpn("198.51.100.4", i * 3600)));
    assert!(out.is_empty(), "{out:#?}");
    let out = ev.observe(tenant(), &vpn("203.0.113.4", 7 * 3600));
    assert_eq!(ids(&out), vec![VPN_NEW_NETWORK_ID]);
    assert_eq!(out[0].kind, DetectionKind::Behavior);

    let mut big = event("http_request");
    big.actor = "kate".into();
    big.details.http = Some(HttpDetails {
        bytes_out: 600_000_000,
        ..Default::default()
    });
    big.occurred_at = at(8 * 3600);
    assert_eq!(ids(&ev.observe(tenant(), &big)), vec![EXFILTRATION_ID]);

    let disabled = TenantRules {
        extra: vec![],
        disabled: [UNUSUAL_HOUR_ID, EXFILTRATION_ID]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    ev.set_tenant_rules(tenant(), disabled);
    big.occurred_at = at(20 * 3600);
    assert!(ev.observe(tenant(), &big).is_empty());
}

// ---- tenants, rule choices, bounds, state ---------------------------------

#[test]
fn tenants_do_not_share_windows() {
    let mut ev = evaluator();
    let other = TenantId(Uuid::from_u128(2));
    let mut out = Vec::new();
    for i in 0..3 {
        out.extend(ev.observe(tenant(), &fail("x", "192.0.2.99", i)));
        out.extend(ev.observe(other, &fail("x", "192.0.2.99", i)));
    }
    assert!(out.is_empty());
    assert_eq!(ev.stats().tenants, 2);
}

#[test]
fn disabled_rules_are_silent_but_still_feed_correlations() {
    let mut ev = evaluator();
    let errors = ev.set_tenant_rules(
        tenant(),
        TenantRules {
            extra: vec![],
            disabled: [BRUTE_IP, AUTH_FAILURE, FIREWALL]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        },
    );
    assert!(errors.is_empty());
    let out = run(&mut ev, (0..6).map(|i| fail("lee", "192.0.2.80", i)));
    assert_eq!(ids(&out), vec![BRUTE_ACTOR]);
    let mut fw = event("firewall.rule_change");
    fw.action = "delete".into();
    assert!(ev.observe(tenant(), &fw).is_empty());
    // Another tenant keeps the defaults.
    let other = TenantId(Uuid::from_u128(3));
    assert_eq!(ids(&ev.observe(other, &fw)), vec![FIREWALL]);
}

const TENANT_CORRELATION: &str = "title: Failures against one service
id: 9542c0ed-ce65-4817-af98-aaada3d34906
correlation:
    type: event_count
    rules:
        - picket_auth_failure
    group-by:
        - service.name
    timespan: 1h
    condition:
        gte: 3
level: medium
tags:
    - attack.credential-access
    - attack.t1110
";

const COMMUNITY_STYLE: &str = "title: Login from a listed address
id: a0c5b695-2d7d-4500-8f6a-e1645a0bb5b7
logsource:
    product: picket
    category: authentication
detection:
    selection:
        src_ip|cidr: 192.0.2.0/28
        User|startswith: adm
    condition: selection
level: high
tags:
    - attack.t1078
";

#[test]
fn tenants_add_their_own_rules_and_a_bad_one_does_not_block_the_rest() {
    let mut ev = evaluator();
    let errors = ev.set_tenant_rules(
        tenant(),
        TenantRules {
            extra: vec![
                RuleSource::new("r1", RuleOrigin::Tenant, TENANT_CORRELATION),
                RuleSource::new("r2", RuleOrigin::Tenant, COMMUNITY_STYLE),
                RuleSource::new("r3", RuleOrigin::Tenant, "title: broken\nid: x\n"),
            ],
            disabled: HashSet::new(),
        },
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].source, "r3");
    let mut events: Vec<NewEvent> = (0..3)
        .map(|i| fail(&format!("m{i}"), &format!("198.51.100.{i}"), i * 600))
        .collect();
    for e in &mut events {
        e.service = "billing-api".into();
    }
    let out = run(&mut ev, events.clone());
    let d = only(&out, "9542c0ed-ce65-4817-af98-aaada3d34906");
    assert_eq!(d.len(), 1, "{out:#?}");
    assert_eq!(
        d[0].entities,
        vec![Entity::new(EntityKind::Service, "billing-api")]
    );
    // Aliased field names (src_ip, User) and cidr work.
    let out = ev.observe(tenant(), &fail("admin7", "192.0.2.14", 5000));
    assert_eq!(only(&out, "a0c5b695-2d7d-4500-8f6a-e1645a0bb5b7").len(), 1);
    let out = ev.observe(tenant(), &fail("admin7", "192.0.2.16", 5001));
    assert!(only(&out, "a0c5b695-2d7d-4500-8f6a-e1645a0bb5b7").is_empty());
    // Other tenants do not see them.
    let other = TenantId(Uuid::from_u128(4));
    let out: Vec<Detection> = events.iter().flat_map(|e| ev.observe(other, e)).collect();
    assert!(out.is_empty());
}

#[test]
fn rule_changes_keep_open_windows() {
    let mut ev = evaluator();
    run(&mut ev, (0..5).map(|i| fail("nina", "192.0.2.90", i)));
    ev.set_tenant_rules(
        tenant(),
        TenantRules {
            extra: vec![RuleSource::new(
                "r1",
                RuleOrigin::Tenant,
                TENANT_CORRELATION,
            )],
            disabled: [FIREWALL.to_string()].into(),
        },
    );
    let out = ev.observe(tenant(), &fail("nina", "192.0.2.90", 10));
    assert_eq!(only(&out, BRUTE_IP).len(), 1);
}

#[test]
fn correlation_state_is_bounded_and_expires() {
    let mut ev = Evaluator::new(
        RuleSet::builtin().clone(),
        EvaluatorConfig {
            max_groups_per_tenant: 20,
            ..Default::default()
        },
    );
    for i in 0..200u32 {
        let ip = format!("10.{}.{}.1", i / 250, i % 250);
        ev.observe(tenant(), &fail(&format!("u{i}"), &ip, i64::from(i)));
    }
    let s = ev.stats();
    // The cap is enforced before each event, which may then open one group
    // per correlation it feeds (three here).
    assert!(s.correlation_groups <= 20 + 3, "{s:?}");
    assert!(s.correlation_groups > 0);
    assert!(s.groups_evicted > 0, "{s:?}");
    ev.advance(at(3600));
    assert_eq!(ev.stats().correlation_groups, 0);
    assert_eq!(ev.stats().evidence_refs, 0);
}

#[test]
fn correlation_groups_evict_the_stalest_and_an_evicted_group_starts_fresh() {
    let mut ev = Evaluator::new(
        RuleSet::builtin().clone(),
        EvaluatorConfig {
            max_groups_per_tenant: 20,
            ..Default::default()
        },
    );
    // Five failures from one IP: one short of the burst.
    let five = run(&mut ev, (0..5).map(|i| fail("dan", "192.0.2.60", i)));
    assert!(only(&five, BRUTE_IP).is_empty());
    // A storm of single failures from fresh IPs, each later than dan's.
    let mut max = 0;
    for i in 0..100u32 {
        ev.observe(
            tenant(),
            &fail(
                &format!("s{i}"),
                &format!("10.9.{}.{}", i / 250, i % 250),
                10,
            ),
        );
        max = max.max(ev.stats().correlation_groups);
    }
    // The cap holds before each event, which may then open one group per
    // correlation it feeds (three here).
    assert!(max <= 20 + 3, "{max}");
    let s = ev.stats();
    assert!(s.groups_evicted >= 80, "{s:?}");
    // Dan's group, the stalest, was dropped: a sixth failure starts a fresh
    // window of one instead of firing the burst.
    let sixth = ev.observe(tenant(), &fail("dan", "192.0.2.60", 11));
    assert!(only(&sixth, BRUTE_IP).is_empty(), "{:?}", ids(&sixth));
}

#[test]
fn max_lookback_covers_rules_and_behaviour() {
    let mut ev = evaluator();
    assert_eq!(ev.max_lookback(), chrono::Duration::days(30));
    let long = TENANT_CORRELATION.replace("timespan: 1h", "timespan: 45d");
    ev.set_tenant_rules(
        tenant(),
        TenantRules {
            extra: vec![RuleSource::new("r", RuleOrigin::Tenant, long)],
            disabled: HashSet::new(),
        },
    );
    assert_eq!(ev.max_lookback(), chrono::Duration::days(45));
}

#[test]
fn replaying_events_rebuilds_state() {
    // What the server does after a restart: replay the lookback, then go on.
    let history: Vec<NewEvent> = (0..5).map(|i| fail("olga", "192.0.2.95", i)).collect();
    let mut before = evaluator();
    run(&mut before, history.clone());
    let mut after_restart = evaluator();
    run(&mut after_restart, history);
    let next = fail("olga", "192.0.2.95", 30);
    assert_eq!(
        ids(&before.observe(tenant(), &next)),
        ids(&after_restart.observe(tenant(), &next))
    );
}

#[test]
fn logsource_category_and_product_restrict_rules() {
    // Failed HTTP requests are not failed authentications.
    let mut ev = evaluator();
    let out = run(
        &mut ev,
        (0..10).map(|i| {
            let mut e = event("http_request");
            e.actor = "pat".into();
            e.source_ip = Some("192.0.2.33".parse().unwrap());
            e.outcome = Outcome::Failure;
            e.occurred_at = at(i);
            e
        }),
    );
    assert!(out.is_empty(), "{out:#?}");
    // A rule for another product never matches Picket events.
    let windows = "title: Windows logon
id: dded9623-b560-4eb4-b963-3372853c4660
logsource:
    product: windows
    service: security
detection:
    selection:
        EventType|contains: login
    condition: selection
level: high
";
    ev.set_tenant_rules(
        tenant(),
        TenantRules {
            extra: vec![RuleSource::new("w", RuleOrigin::Directory, windows)],
            disabled: HashSet::new(),
        },
    );
    let out = ev.observe(tenant(), &login("pat", "192.0.2.33", Outcome::Success, 20));
    assert!(out.is_empty(), "{out:#?}");
}

#[test]
fn the_evaluator_can_move_between_threads() {
    fn send<T: Send + Sync>() {}
    send::<Evaluator>();
    send::<RuleSet>();
}

#[test]
fn single_event_fingerprints_follow_actor_ip_and_resource() {
    let mut ev = evaluator();
    let delete = |resource: &str| {
        let mut e = event("tenant.delete");
        e.actor = "ops".into();
        e.resource = resource.into();
        e
    };
    let a1 = ev.observe(tenant(), &delete("acme")).remove(0);
    let a2 = ev.observe(tenant(), &delete("acme")).remove(0);
    let b = ev.observe(tenant(), &delete("globex")).remove(0);
    assert_eq!(a1.fingerprint, a2.fingerprint);
    assert_ne!(a1.fingerprint, b.fingerprint);
}
