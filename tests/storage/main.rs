//! Storage conformance suite: every case runs against both backends, so the
//! Postgres and SQLite stores cannot drift apart. Postgres-only checks (row-level
//! security) and the schema-parity check are at the end.

#[path = "../common/mod.rs"]
mod common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use common::TestDb;
use picket::domain::alert::{Entity, EntityKind, NewAlert, SourceKind};
use picket::domain::webhook::{DeliveryOutcome, WebhookSource};
use picket::domain::{ApiKey, ApiKeyId, Scope, ScopeSet, Severity, Tenant, TenantId};
use picket::storage::{self, Backend, Store, StoreError, WebhookStore};

async fn store(backend: Backend) -> (Arc<dyn Store>, TestDb) {
    let db = TestDb::new(backend).await;
    let s = storage::connect(&db.url, 4).await.expect("connect store");
    assert_eq!(s.backend(), backend);
    (s, db)
}

fn tenant(name: &str) -> Tenant {
    Tenant {
        id: TenantId::new(),
        name: name.into(),
        display_name: format!("{name} display"),
        retention_days: 30,
        // Whole microseconds: both backends keep microsecond precision.
        created_at: chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap(),
    }
}

fn key(tenant: TenantId, id: &str, created_offset_s: i64) -> ApiKey {
    ApiKey {
        id: ApiKeyId::parse(id).unwrap(),
        tenant_id: tenant,
        name: format!("key {id}"),
        scopes: [Scope::Ingest, Scope::Read].into_iter().collect(),
        secret_hash: vec![7u8; 32],
        created_at: chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
            + Duration::seconds(created_offset_s),
        expires_at: None,
        revoked_at: None,
    }
}

async fn tenants_round_trip(backend: Backend) {
    let (s, _db) = store(backend).await;
    let t = tenant("acme");
    s.create_tenant(&t).await.unwrap();
    assert_eq!(s.get_tenant(t.id).await.unwrap(), t);
    assert_eq!(
        s.find_tenant_by_name("acme").await.unwrap(),
        Some(t.clone())
    );
    assert_eq!(s.find_tenant_by_name("nope").await.unwrap(), None);
    assert!(matches!(
        s.get_tenant(TenantId::new()).await,
        Err(StoreError::NotFound(_))
    ));

    let mut dup = tenant("acme");
    dup.id = TenantId::new();
    assert!(matches!(
        s.create_tenant(&dup).await,
        Err(StoreError::Conflict(_))
    ));

    let mut changed = t.clone();
    changed.display_name = "Acme Corp".into();
    changed.retention_days = 7;
    s.update_tenant(&changed).await.unwrap();
    assert_eq!(s.get_tenant(t.id).await.unwrap(), changed);
    assert!(matches!(
        s.update_tenant(&tenant("ghost")).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn tenants_page_by_name(backend: Backend) {
    let (s, _db) = store(backend).await;
    for n in ["delta", "alpha", "charlie", "bravo", "echo"] {
        s.create_tenant(&tenant(n)).await.unwrap();
    }
    let first = s.list_tenants(None, 2).await.unwrap();
    assert_eq!(
        first.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "bravo"]
    );
    let second = s.list_tenants(Some("bravo"), 2).await.unwrap();
    assert_eq!(
        second.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["charlie", "delta"]
    );
    let last = s.list_tenants(Some("delta"), 2).await.unwrap();
    assert_eq!(
        last.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["echo"]
    );
}

async fn settings_first_writer_wins(backend: Backend) {
    let (s, _db) = store(backend).await;
    assert_eq!(s.get_setting("k").await.unwrap(), None);
    assert_eq!(s.put_setting_if_absent("k", "one").await.unwrap(), "one");
    assert_eq!(s.put_setting_if_absent("k", "two").await.unwrap(), "one");
    assert_eq!(s.get_setting("k").await.unwrap().as_deref(), Some("one"));
}

async fn api_keys_are_tenant_scoped(backend: Backend) {
    let (s, _db) = store(backend).await;
    let a = tenant("a");
    let b = tenant("b");
    s.create_tenant(&a).await.unwrap();
    s.create_tenant(&b).await.unwrap();
    let ka1 = key(a.id, "00000000000000a1", 0);
    let ka2 = key(a.id, "00000000000000a2", 1);
    let kb1 = key(b.id, "00000000000000b1", 0);
    for k in [&ka1, &ka2, &kb1] {
        s.create_api_key(k).await.unwrap();
    }
    assert!(matches!(
        s.create_api_key(&ka1).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.create_api_key(&key(TenantId::new(), "00000000000000c1", 0))
            .await,
        Err(StoreError::NotFound(_))
    ));

    // Lookup by id works across tenants (authentication does it before knowing the tenant).
    assert_eq!(s.find_api_key(&kb1.id).await.unwrap(), Some(kb1.clone()));
    assert_eq!(
        s.find_api_key(&ApiKeyId::parse("ffffffffffffffff").unwrap())
            .await
            .unwrap(),
        None
    );

    // Listing is per tenant, newest first.
    let listed = s.list_api_keys(a.id).await.unwrap();
    assert_eq!(listed, vec![ka2.clone(), ka1.clone()]);
    assert_eq!(s.list_api_keys(b.id).await.unwrap(), vec![kb1.clone()]);

    // A tenant cannot revoke another tenant's key.
    let now = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    assert!(matches!(
        s.revoke_api_key(a.id, &kb1.id, now).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        s.find_api_key(&kb1.id).await.unwrap().unwrap().revoked_at,
        None
    );

    // Revocation keeps the first time.
    let revoked = s.revoke_api_key(b.id, &kb1.id, now).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(now));
    let again = s
        .revoke_api_key(b.id, &kb1.id, now + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(again.revoked_at, Some(now));
    assert!(!again.is_active(Utc::now()));
}

async fn key_fields_round_trip(backend: Backend) {
    let (s, _db) = store(backend).await;
    let t = tenant("t");
    s.create_tenant(&t).await.unwrap();
    let mut k = key(t.id, "0123456789abcdef", 0);
    k.scopes = ScopeSet::all();
    k.secret_hash = (0u8..32).collect();
    k.expires_at = Some(k.created_at + Duration::days(90));
    s.create_api_key(&k).await.unwrap();
    assert_eq!(s.find_api_key(&k.id).await.unwrap(), Some(k));
}

fn source(tenant: TenantId, name: &str) -> WebhookSource {
    let now = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    WebhookSource {
        tenant_id: tenant,
        id: uuid::Uuid::now_v7(),
        name: name.into(),
        sealed_secret: vec![1, 2, 3, name.len() as u8],
        allow_body_only_signature: name.ends_with("legacy"),
        created_at: now,
        secret_rotated_at: now,
    }
}

fn webhook_alert(source: &str, ip: &str) -> NewAlert {
    let now = Utc::now();
    NewAlert {
        title: "t".into(),
        summary: String::new(),
        severity: Severity::High,
        category: "authentication".into(),
        source_kind: SourceKind::Webhook,
        source_name: source.into(),
        anomaly_score: 0.0,
        anomaly_threshold: 0.0,
        entities: vec![Entity::new(EntityKind::Ip, ip)],
        evidence: Vec::new(),
        features: Vec::new(),
        attack_techniques: Vec::new(),
        first_seen: now,
        last_seen: now,
        fingerprint: format!("webhook:{source}:{ip}"),
        raw: Some(serde_json::json!({"ip": ip})),
    }
}

async fn webhook_sources_are_tenant_scoped(backend: Backend) {
    let (s, _db) = store(backend).await;
    let a = tenant("a");
    let b = tenant("b");
    s.create_tenant(&a).await.unwrap();
    s.create_tenant(&b).await.unwrap();
    let a2 = source(a.id, "a-two");
    let a1 = source(a.id, "a-one-legacy");
    let b1 = source(b.id, "b-one");
    for w in [&a2, &a1, &b1] {
        s.create_webhook_source(w).await.unwrap();
    }
    // Names are unique across tenants; the tenant must exist.
    assert!(matches!(
        s.create_webhook_source(&source(b.id, "a-two")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.create_webhook_source(&source(TenantId::new(), "ghost"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        s.list_webhook_sources(a.id).await.unwrap(),
        vec![a1.clone(), a2.clone()],
        "by name, only the tenant's own"
    );
    // Lookup by name and the owner of an id work across tenants.
    assert_eq!(
        s.find_webhook_source("b-one").await.unwrap(),
        Some(b1.clone())
    );
    assert_eq!(s.find_webhook_source("nope").await.unwrap(), None);
    assert_eq!(s.webhook_source_tenant(b1.id).await.unwrap(), Some(b.id));
    assert_eq!(
        s.webhook_source_tenant(uuid::Uuid::new_v4()).await.unwrap(),
        None
    );

    // Another tenant can neither rotate nor delete it.
    let at = a1.created_at + Duration::seconds(5);
    assert!(matches!(
        s.rotate_webhook_secret(b.id, a1.id, &[9], at).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.delete_webhook_source(b.id, a1.id).await,
        Err(StoreError::NotFound(_))
    ));
    let rotated = s
        .rotate_webhook_secret(a.id, a1.id, &[9, 9], at)
        .await
        .unwrap();
    assert_eq!(rotated.sealed_secret, vec![9, 9]);
    assert_eq!(rotated.secret_rotated_at, at);
    assert_eq!(rotated.created_at, a1.created_at);
    assert_eq!(
        s.find_webhook_source(&a1.name).await.unwrap(),
        Some(rotated)
    );

    s.delete_webhook_source(a.id, a1.id).await.unwrap();
    assert_eq!(s.find_webhook_source(&a1.name).await.unwrap(), None);
    assert!(matches!(
        s.delete_webhook_source(a.id, a1.id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.list_webhook_sources(a.id).await.unwrap(), vec![a2]);
}

async fn webhook_deliveries_are_deduplicated_with_the_alert(backend: Backend) {
    let (s, _db) = store(backend).await;
    let a = tenant("a");
    s.create_tenant(&a).await.unwrap();
    let w = source(a.id, "hooks");
    let other = source(a.id, "other");
    s.create_webhook_source(&w).await.unwrap();
    s.create_webhook_source(&other).await.unwrap();
    let supp = Duration::minutes(10);
    let now = Utc::now();

    let first = s
        .raise_webhook_alert(
            a.id,
            w.id,
            Some("d1"),
            webhook_alert("hooks", "10.0.0.1"),
            supp,
            now,
        )
        .await
        .unwrap();
    let DeliveryOutcome::Raised(alert, true) = first else {
        panic!("expected a created alert, got {first:?}");
    };
    assert_eq!(alert.body.raw, Some(serde_json::json!({"ip": "10.0.0.1"})));
    assert_eq!(s.get_alert(a.id, alert.id).await.unwrap(), *alert);
    // The same delivery id: nothing written.
    let again = s
        .raise_webhook_alert(
            a.id,
            w.id,
            Some("d1"),
            webhook_alert("hooks", "10.0.0.9"),
            supp,
            now,
        )
        .await
        .unwrap();
    assert_eq!(again, DeliveryOutcome::Duplicate);
    let all = s
        .list_alerts(
            a.id,
            &picket::domain::alert::AlertQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].occurrence_count, 1);
    // Ids are per source; no id means no dedupe; the same fingerprint folds.
    let DeliveryOutcome::Raised(_, true) = s
        .raise_webhook_alert(
            a.id,
            other.id,
            Some("d1"),
            webhook_alert("other", "10.0.0.1"),
            supp,
            now,
        )
        .await
        .unwrap()
    else {
        panic!("another source's d1 is not a duplicate");
    };
    for _ in 0..2 {
        let DeliveryOutcome::Raised(folded, false) = s
            .raise_webhook_alert(
                a.id,
                w.id,
                None,
                webhook_alert("hooks", "10.0.0.1"),
                supp,
                now,
            )
            .await
            .unwrap()
        else {
            panic!("expected a fold");
        };
        assert_eq!(folded.id, alert.id);
    }
    assert_eq!(
        s.get_alert(a.id, alert.id).await.unwrap().occurrence_count,
        3
    );
    // A deleted source's delivery ids go with it.
    s.delete_webhook_source(a.id, w.id).await.unwrap();
    assert!(matches!(
        s.raise_webhook_alert(
            a.id,
            w.id,
            Some("d2"),
            webhook_alert("hooks", "10.0.0.1"),
            supp,
            now
        )
        .await,
        Err(StoreError::NotFound(_))
    ));
}

/// Detection shards: on Postgres, which several replicas share, a shard
/// locked by one replica is refused to another, presence counts the
/// replicas, a replica with another shard count is refused, and a replica's
/// shards and presence go when its connection ends. SQLite has one process,
/// which is alone and locks every shard.
async fn detection_shards_are_exclusive_where_replicas_share_the_store(backend: Backend) {
    use storage::Joined;
    let member = |j: Joined| match j {
        Joined::Member(locks) => locks,
        Joined::Refused(why) => panic!("refused: {why}"),
    };
    let (s, db) = store(backend).await;
    let a = member(s.join_detection(8).await.unwrap());
    assert!(!a.lost().is_cancelled());
    assert_eq!(a.try_lock(&[3, 4, 5], 2).await.unwrap(), vec![3, 4]);
    let other = storage::connect(&db.url, 2).await.unwrap();
    match backend {
        Backend::Postgres => {
            let b = member(other.join_detection(8).await.unwrap());
            assert_eq!(a.replicas().await.unwrap(), 2);
            assert_eq!(b.replicas().await.unwrap(), 2);
            assert_eq!(
                b.try_lock(&[3, 4, 5, 6], 8).await.unwrap(),
                vec![5, 6],
                "shards held by another replica are refused"
            );
            assert!(a.try_lock(&[5], 1).await.unwrap().is_empty());
            a.unlock(3).await.unwrap();
            assert_eq!(b.try_lock(&[3], 1).await.unwrap(), vec![3]);
            // A version with one detection leader and no shards cannot lead
            // beside members.
            let old_leader = |db_url: String| async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&db_url).await.unwrap();
                let took: bool =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('picket:detection'))")
                        .fetch_one(&mut conn)
                        .await
                        .unwrap();
                (took, conn)
            };
            assert!(
                !old_leader(db.url.clone()).await.0,
                "an old leader beside members"
            );
            // Another count would put tenants in other shards: refused.
            match other.join_detection(16).await.unwrap() {
                Joined::Refused(why) => assert!(why.contains("16"), "{why}"),
                Joined::Member(_) => panic!("a replica with another shard count joined"),
            }
            // Kill A's connection: A notices, and its shard and presence go.
            let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
            sqlx::query(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objid = 4 AND l.objsubid = 2 \
                 AND l.pid <> pg_backend_pid() \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .execute(&admin)
            .await
            .unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(10), a.lost().cancelled())
                .await
                .expect("the holder notices its lost connection");
            assert_eq!(b.replicas().await.unwrap(), 1);
            assert_eq!(b.try_lock(&[4], 1).await.unwrap(), vec![4]);
            drop(b);
            // Nor members beside an old leader.
            let (took, old) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                loop {
                    let (took, conn) = old_leader(db.url.clone()).await;
                    if took {
                        break (took, conn);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            })
            .await
            .expect("the old leader's lock is free once the members are gone");
            assert!(took);
            match other.join_detection(8).await.unwrap() {
                Joined::Refused(why) => assert!(why.contains("earlier version"), "{why}"),
                Joined::Member(_) => panic!("a member joined beside an old leader"),
            }
            drop(old);
            // With nobody left, another count may join.
            let c = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                loop {
                    match other.join_detection(16).await.unwrap() {
                        Joined::Member(locks) => break locks,
                        Joined::Refused(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await
                        }
                    }
                }
            })
            .await
            .expect("the count of the replicas gone no longer binds");
            assert_eq!(c.replicas().await.unwrap(), 1);
        }
        Backend::Sqlite => {
            let b = member(other.join_detection(8).await.unwrap());
            assert_eq!(b.replicas().await.unwrap(), 1);
            assert_eq!(b.try_lock(&[3, 4], 2).await.unwrap(), vec![3, 4]);
        }
    }
}

/// A rule alert of fingerprint `fp` seen `at_s` seconds after a fixed start.
fn rule_alert(fp: &str, at_s: i64) -> NewAlert {
    let at = chrono::DateTime::from_timestamp(1_800_000_000 + at_s, 0).unwrap();
    NewAlert {
        title: format!("rule {fp}"),
        summary: format!("seen at {at_s}"),
        severity: Severity::Medium,
        category: "authentication".into(),
        source_kind: SourceKind::Rule,
        source_name: fp.into(),
        anomaly_score: 0.0,
        anomaly_threshold: 0.0,
        entities: vec![Entity::new(EntityKind::Actor, format!("user-{at_s}"))],
        evidence: vec![picket::domain::alert::Evidence {
            event_id: uuid::Uuid::now_v7(),
            snapshot: None,
        }],
        features: Vec::new(),
        attack_techniques: Vec::new(),
        first_seen: at,
        last_seen: at,
        fingerprint: fp.into(),
        raw: None,
    }
}

/// What must be equal between two tenants' alerts raised the same way.
fn shape(a: &picket::domain::alert::Alert) -> serde_json::Value {
    serde_json::json!([
        a.fingerprint,
        a.occurrence_count,
        a.first_seen,
        a.last_seen,
        a.summary,
        a.status.as_i16(),
        a.body.entities,
        a.body.evidence.len(),
    ])
}

/// A batch raise gives exactly what raising its alerts one at a time gives:
/// folds within the suppression window (into stored alerts and into alerts
/// created earlier in the batch), never into resolved alerts or alerts
/// outside the window, and one change-log entry per raise, in order.
async fn raise_alerts_matches_raising_one_at_a_time(backend: Backend) {
    let (s, _db) = store(backend).await;
    let one = tenant("one");
    let batch = tenant("batch");
    s.create_tenant(&one).await.unwrap();
    s.create_tenant(&batch).await.unwrap();
    let supp = Duration::minutes(10);
    let now = Utc::now();
    // Stored before: an open alert "a", a resolved alert "b", an old open "e".
    for t in [one.id, batch.id] {
        s.raise_alert(t, rule_alert("a", 0), supp, now)
            .await
            .unwrap();
        let (b, _) = s
            .raise_alert(t, rule_alert("b", 0), supp, now)
            .await
            .unwrap();
        s.update_alert_status(
            t,
            b.id,
            picket::domain::alert::AlertStatus::Resolved,
            "me",
            "",
            now,
        )
        .await
        .unwrap();
        s.raise_alert(t, rule_alert("e", -3600), supp, now)
            .await
            .unwrap();
    }
    let input = vec![
        rule_alert("a", 60),   // folds into the stored open alert
        rule_alert("b", 60),   // the stored one is resolved: a new alert
        rule_alert("c", 0),    // new
        rule_alert("c", 120),  // folds into the one just created
        rule_alert("a", 180),  // folds again
        rule_alert("c", 1200), // 18 min after c's last: a new alert
        rule_alert("e", 0),    // the stored "e" is outside the window: new
        rule_alert("c", 1300), // folds into the newer "c"
    ];
    let mut expected = Vec::new();
    for n in input.clone() {
        expected.push(s.raise_alert(one.id, n, supp, now).await.unwrap());
    }
    let got = s.raise_alerts(batch.id, input, supp, now).await.unwrap();
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!((shape(&g.0), g.1), (shape(&e.0), e.1));
        assert_eq!(g.0.tenant_id, batch.id);
    }
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        [false, true, true, false, false, true, true, false]
    );
    // The stored alerts are the final states returned.
    for (g, _) in &got {
        let stored = s.get_alert(batch.id, g.id).await.unwrap();
        let last = got.iter().rev().find(|x| x.0.id == g.id).unwrap();
        assert_eq!(stored, last.0);
    }
    let all = |t: TenantId| {
        let s = s.clone();
        async move {
            let mut v: Vec<_> = s
                .list_alerts(
                    t,
                    &picket::domain::alert::AlertQuery {
                        limit: 100,
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
                .iter()
                .map(shape)
                .collect();
            v.sort_by_key(|x| x.to_string());
            v
        }
    };
    assert_eq!(all(batch.id).await, all(one.id).await);
    // One change per raise, in input order, each carrying that raise's state.
    // The whole log once all 12 changes (4 before, 8 raises) are readable (on
    // Postgres a transaction of a concurrent test may hold them back briefly).
    let log = |t: TenantId| {
        let s = s.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let all = s
                    .changes_after(t, "alerts", Default::default(), 100)
                    .await
                    .unwrap();
                if all.len() >= 12 || std::time::Instant::now() > deadline {
                    return all;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    let (log_one, log_batch) = (log(one.id).await, log(batch.id).await);
    assert_eq!((log_one.len(), log_batch.len()), (12, 12));
    let (log_one, log_batch) = (&log_one[4..], &log_batch[4..]);
    for ((c, o), g) in log_batch.iter().zip(log_one).zip(&got) {
        assert_eq!(c.kind, o.kind);
        assert_eq!(c.kind, if g.1 { "created" } else { "updated" });
        assert_eq!(c.subject_id, g.0.id);
        let payload: picket::domain::alert::Alert =
            serde_json::from_value(c.payload.clone()).unwrap();
        assert_eq!(payload, g.0);
    }
    // Each state of an alert is newer than the one before, also in one batch.
    for w in log_batch.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.subject_id == b.subject_id {
            let at = |c: &picket::domain::alert::Change| {
                serde_json::from_value::<picket::domain::alert::Alert>(c.payload.clone())
                    .unwrap()
                    .updated_at
            };
            assert!(at(b) > at(a), "{} then {}", at(a), at(b));
        }
    }
    // An empty batch writes nothing.
    assert!(
        s.raise_alerts(batch.id, Vec::new(), supp, now)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(log(batch.id).await.len(), 12);
}

/// Raises stay within their tenant: a batch never folds into another
/// tenant's alert of the same fingerprint.
async fn raise_alerts_are_tenant_scoped(backend: Backend) {
    let (s, _db) = store(backend).await;
    let a = tenant("a");
    let b = tenant("b");
    s.create_tenant(&a).await.unwrap();
    s.create_tenant(&b).await.unwrap();
    let supp = Duration::minutes(10);
    let now = Utc::now();
    let (other, _) = s
        .raise_alert(b.id, rule_alert("x", 0), supp, now)
        .await
        .unwrap();
    let got = s
        .raise_alerts(
            a.id,
            vec![rule_alert("x", 1), rule_alert("x", 2)],
            supp,
            now,
        )
        .await
        .unwrap();
    assert!(got[0].1 && !got[1].1);
    assert_ne!(got[0].0.id, other.id);
    assert_eq!(
        s.get_alert(b.id, other.id).await.unwrap().occurrence_count,
        1
    );
    assert_eq!(
        s.get_alert(a.id, got[0].0.id)
            .await
            .unwrap()
            .occurrence_count,
        2
    );
}

/// Evidence snapshots are stored once per event beside the alerts: alert
/// documents and change-log entries carry evidence ids only, and every read
/// that hands alerts out (get, list, a fold's result, a status change, the
/// change log through `fill_evidence`) has each snapshot back, for every
/// alert naming the event, and only within its own tenant.
async fn evidence_snapshots_are_stored_once_and_filled_on_read(backend: Backend) {
    use picket::domain::alert::{AlertQuery, AlertStatus, Evidence};
    let (s, db) = store(backend).await;
    let a = tenant("a");
    let b = tenant("b");
    s.create_tenant(&a).await.unwrap();
    s.create_tenant(&b).await.unwrap();
    let supp = Duration::minutes(10);
    let now = Utc::now();
    let ev: Vec<_> = (0..3)
        .map(|n| events::event(&format!("k{n}"), "alice", n))
        .collect();
    let with = |fp: &str, at: i64, events: &[&picket::domain::event::NewEvent]| {
        let mut n = rule_alert(fp, at);
        n.evidence = events
            .iter()
            .map(|e| Evidence {
                event_id: e.id,
                snapshot: Some((*e).clone()),
            })
            .collect();
        n
    };
    // Two alerts share event 1; the second raise of "x" folds in event 2.
    let got = s
        .raise_alerts(
            a.id,
            vec![
                with("x", 0, &[&ev[0], &ev[1]]),
                with("y", 0, &[&ev[1]]),
                with("x", 1, &[&ev[1], &ev[2]]),
            ],
            supp,
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        [true, true, false]
    );
    let x = got[2].0.id;
    let y = got[1].0.id;
    // What the batch returns carries ids only.
    assert!(
        got.iter()
            .all(|(a, _)| a.body.evidence.iter().all(|e| e.snapshot.is_none()))
    );
    let expect = |alert: &picket::domain::alert::Alert,
                  ids: &[&picket::domain::event::NewEvent]| {
        let found: Vec<_> = alert
            .body
            .evidence
            .iter()
            .map(|e| (e.event_id, e.snapshot.clone()))
            .collect();
        let want: Vec<_> = ids.iter().map(|e| (e.id, Some((*e).clone()))).collect();
        assert_eq!(found, want, "alert {}", alert.fingerprint);
    };
    expect(
        &s.get_alert(a.id, x).await.unwrap(),
        &[&ev[0], &ev[1], &ev[2]],
    );
    expect(&s.get_alert(a.id, y).await.unwrap(), &[&ev[1]]);
    let listed = s
        .list_alerts(
            a.id,
            &AlertQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    for l in &listed {
        if l.id == x {
            expect(l, &[&ev[0], &ev[1], &ev[2]]);
        } else {
            expect(l, &[&ev[1]]);
        }
    }
    // The change log: three states, ids only, filled on request (readable
    // once the cluster's older transactions, other tests', have ended).
    db.feeds_settled().await;
    let changes = s
        .changes_after(a.id, "alerts", Default::default(), 100)
        .await
        .unwrap();
    assert_eq!(changes.len(), 3);
    let mut logged: Vec<picket::domain::alert::Alert> = changes
        .into_iter()
        .map(|c| {
            assert!(!c.payload.to_string().contains("snapshot"), "{}", c.payload);
            serde_json::from_value(c.payload).unwrap()
        })
        .collect();
    s.fill_evidence(a.id, &mut logged).await.unwrap();
    expect(&logged[0], &[&ev[0], &ev[1]]);
    expect(&logged[1], &[&ev[1]]);
    expect(&logged[2], &[&ev[0], &ev[1], &ev[2]]);
    // One alert at a time: a fold returns every snapshot, old and new.
    let (folded, created) = s
        .raise_alert(a.id, with("y", 2, &[&ev[2]]), supp, now)
        .await
        .unwrap();
    assert!(!created);
    expect(&folded, &[&ev[1], &ev[2]]);
    let acked = s
        .update_alert_status(a.id, y, AlertStatus::Acknowledged, "t", "", now)
        .await
        .unwrap();
    expect(&acked, &[&ev[1], &ev[2]]);
    // Another tenant naming the same event ids finds no snapshot of a's.
    let (other, _) = s
        .raise_alert(b.id, rule_alert("x", 0), supp, now)
        .await
        .unwrap();
    let mut foreign = s.get_alert(b.id, other.id).await.unwrap();
    foreign.body.evidence = vec![Evidence {
        event_id: ev[0].id,
        snapshot: None,
    }];
    s.fill_evidence(b.id, std::slice::from_mut(&mut foreign))
        .await
        .unwrap();
    assert!(foreign.body.evidence[0].snapshot.is_none());
}

/// Throughput of batched raising (run by hand; see docs/PERFORMANCE.md):
/// `cargo test --release --test storage -- --ignored --nocapture raise_alerts_throughput`.
#[tokio::test]
#[ignore = "a measurement, run by hand"]
async fn raise_alerts_throughput() {
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let (s, _db) = store(backend).await;
        let t = tenant("storm");
        s.create_tenant(&t).await.unwrap();
        let supp = Duration::hours(1);
        let now = Utc::now();
        // A credential-stuffing storm: 2,000 users, each alerted repeatedly.
        let total = 20_000;
        let batch = 1000; // the alert writer's batch (pipeline/raiser.rs)
        let started = std::time::Instant::now();
        for b in 0..total / batch {
            let alerts = (0..batch)
                .map(|n| {
                    let i = b * batch + n;
                    rule_alert(&format!("brute:user-{}", i % 2000), i as i64 / 100)
                })
                .collect();
            s.raise_alerts(t.id, alerts, supp, now).await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{backend:?}: {total} raises in batches of {batch}: {secs:.2} s, {:.0} raises/s",
            total as f64 / secs
        );
    }
}

/// Incident timelines are stored apart from the incident: a head read
/// (correlation) carries none of the stored entries, a save of it appends
/// only the entries recorded since, and a full read has them all in order,
/// each exactly once. A save of a stale head is a conflict.
async fn incident_timeline_is_appended_from_heads(backend: Backend) {
    use picket::domain::incident::{Incident, IncidentQuery, TimelineKind};
    let (s, _db) = store(backend).await;
    let t = tenant("t");
    s.create_tenant(&t).await.unwrap();
    let now = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let mut inc = Incident::new(t.id, "title".into(), "d".into(), Severity::High, now);
    let created = inc.record(
        "system",
        TimelineKind::Created,
        "opened".into(),
        String::new(),
        now,
    );
    inc.record(
        "system",
        TimelineKind::NoteAdded,
        "n1".into(),
        "one".into(),
        now,
    );
    let stored = s.insert_incident(&inc, &created, &[]).await.unwrap();
    let q = IncidentQuery {
        limit: 10,
        ..Default::default()
    };
    let mut head = s.list_incident_heads(t.id, &q).await.unwrap().remove(0);
    assert!(head.timeline.is_empty());
    assert_eq!(head.timeline_skipped, 2);
    assert_eq!(head.version, stored.version);
    let e3 = head.record(
        "system",
        TimelineKind::NoteAdded,
        "n2".into(),
        "two".into(),
        now,
    );
    let e4 = head.record(
        "system",
        TimelineKind::NoteAdded,
        "n3".into(),
        "three".into(),
        now,
    );
    let saved = s.update_incident(&head, &e4, &[]).await.unwrap();
    // The stale head (same version) can no longer be saved.
    assert!(matches!(
        s.update_incident(&head, &e4, &[]).await,
        Err(StoreError::Conflict(_))
    ));
    let full = s.get_incident(t.id, inc.id).await.unwrap();
    let subjects: Vec<&str> = full.timeline.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects, ["", "one", "two", "three"]);
    assert_eq!(full.timeline[2], e3);
    assert_eq!(full.timeline_skipped, 0);
    assert_eq!(full.version, saved.version);
    // A full read, changed and saved, appends its one new entry.
    let mut again = full.clone();
    let e5 = again.record(
        "system",
        TimelineKind::NoteAdded,
        "n4".into(),
        "four".into(),
        now,
    );
    s.update_incident(&again, &e5, &[]).await.unwrap();
    let listed = s.list_incidents(t.id, &q).await.unwrap().remove(0);
    assert_eq!(listed.timeline.len(), 5);
    assert_eq!(listed.timeline[4], e5);
    assert_eq!(listed.timeline[..4], full.timeline[..]);
    let heads = s.list_incident_heads(t.id, &q).await.unwrap();
    assert_eq!(heads[0].timeline_skipped, 5);
}

/// Incidents created together (a correlation batch) are stored as one
/// creation each would store them: version 1, the whole timeline, one
/// "created" change each in order, and their alerts linked, each alert
/// logged once; incidents of two tenants are refused together.
async fn incidents_created_together_match_one_at_a_time(backend: Backend) {
    use picket::domain::incident::{Incident, TimelineKind};
    let (s, _db) = store(backend).await;
    let t = tenant("t");
    s.create_tenant(&t).await.unwrap();
    let supp = Duration::minutes(10);
    let now = chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
    let mut alerts = Vec::new();
    for fp in ["a", "b", "c"] {
        alerts.push(
            s.raise_alert(t.id, rule_alert(fp, 0), supp, now)
                .await
                .unwrap()
                .0,
        );
    }
    let mut new = Vec::new();
    for (n, link) in [vec![alerts[0].id, alerts[1].id], vec![alerts[2].id]]
        .into_iter()
        .enumerate()
    {
        let mut inc = Incident::new(t.id, format!("i{n}"), "d".into(), Severity::High, now);
        let created = inc.record(
            "system",
            TimelineKind::Created,
            "opened".into(),
            String::new(),
            now,
        );
        inc.record(
            "system",
            TimelineKind::AlertLinked,
            "linked".into(),
            format!("{n}"),
            now,
        );
        new.push((inc, created, link));
    }
    let saved = s.insert_incidents(&new).await.unwrap();
    assert_eq!(saved.len(), 2);
    for ((got, (inc, _, link)), n) in saved.iter().zip(&new).zip(0..) {
        assert_eq!(got.version, 1);
        assert_eq!(got.id, inc.id);
        let full = s.get_incident(t.id, inc.id).await.unwrap();
        assert_eq!(full.version, 1);
        assert_eq!(full.title, format!("i{n}"));
        assert_eq!(full.timeline, inc.timeline);
        for a in link {
            let stored = s.get_alert(t.id, *a).await.unwrap();
            assert_eq!(stored.incident_id, Some(inc.id));
        }
    }
    // Readable once no other transaction holds the log back.
    let log = |stream: &'static str, want: usize| {
        let s = s.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let all = s
                    .changes_after(t.id, stream, Default::default(), 100)
                    .await
                    .unwrap();
                if all.len() >= want || std::time::Instant::now() > deadline {
                    return all;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    let incidents = log("incidents", 2).await;
    assert_eq!(
        incidents
            .iter()
            .map(|c| (c.subject_id, c.kind.as_str()))
            .collect::<Vec<_>>(),
        [(new[0].0.id, "created"), (new[1].0.id, "created")]
    );
    // Three raises, then one link each.
    let linked = log("alerts", 6).await;
    assert_eq!(linked.len(), 6);
    let updated: Vec<_> = linked.iter().filter(|c| c.kind == "updated").collect();
    assert_eq!(updated.len(), 3);
    for c in &updated {
        let a: picket::domain::alert::Alert = serde_json::from_value(c.payload.clone()).unwrap();
        assert!(a.incident_id.is_some());
    }
    let mut subjects: Vec<_> = updated.iter().map(|c| c.subject_id).collect();
    subjects.sort();
    let mut ids: Vec<_> = alerts.iter().map(|a| a.id).collect();
    ids.sort();
    assert_eq!(subjects, ids);
    // Nothing at all to create is nothing written.
    assert!(s.insert_incidents(&[]).await.unwrap().is_empty());
    // Two tenants at once: refused, nothing stored.
    let other = tenant("other");
    s.create_tenant(&other).await.unwrap();
    let mut mixed = Vec::new();
    for tid in [t.id, other.id] {
        let mut inc = Incident::new(tid, "m".into(), "d".into(), Severity::Low, now);
        let created = inc.record(
            "system",
            TimelineKind::Created,
            "opened".into(),
            String::new(),
            now,
        );
        mixed.push((inc, created, Vec::new()));
    }
    assert!(s.insert_incidents(&mixed).await.is_err());
    assert!(s.get_incident(t.id, mixed[0].0.id).await.is_err());
}

crate::both_backends!(
    incidents_created_together_match_one_at_a_time,
    evidence_snapshots_are_stored_once_and_filled_on_read,
    incident_timeline_is_appended_from_heads,
    raise_alerts_matches_raising_one_at_a_time,
    raise_alerts_are_tenant_scoped,
    detection_shards_are_exclusive_where_replicas_share_the_store,
    tenants_round_trip,
    tenants_page_by_name,
    settings_first_writer_wins,
    api_keys_are_tenant_scoped,
    key_fields_round_trip,
    webhook_sources_are_tenant_scoped,
    webhook_deliveries_are_deduplicated_with_the_alert,
);

/// Tables and their columns, sorted, without sqlx's own bookkeeping table.
async fn schema_of(backend: Backend, url: &str) -> Vec<(String, Vec<String>)> {
    use sqlx::Row;
    let rows: Vec<(String, String)> = match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let rows = sqlx::query(
                // Partitions repeat their table's columns.
                "SELECT table_name::text, column_name::text FROM information_schema.columns c \
                 JOIN pg_class r ON r.oid = format('%I', c.table_name)::regclass \
                 WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' \
                 AND NOT r.relispartition ORDER BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        }
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            let rows = sqlx::query(
                "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p \
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> '_sqlx_migrations' ORDER BY 1, 2",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        }
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (table, column) in rows {
        match out.last_mut() {
            Some((t, cols)) if *t == table => cols.push(column),
            _ => out.push((table, vec![column])),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_schemas_declare_the_same_tables_and_columns() {
    let (_pg, pg_db) = store(Backend::Postgres).await;
    let (_lite, lite_db) = store(Backend::Sqlite).await;
    let mut pg = schema_of(Backend::Postgres, &pg_db.url).await;
    let lite = schema_of(Backend::Sqlite, &lite_db.url).await;
    // The one deliberate difference: Postgres keeps idempotency keys apart
    // from its partitioned events (SQLite's unique index is on `events`).
    let keys = pg.iter().position(|(t, _)| t == "event_keys");
    let (_, cols) = pg.remove(keys.expect("event_keys on Postgres"));
    assert_eq!(cols, ["id", "idem", "occurred_at", "tenant_id"]);
    assert!(!pg.is_empty());
    assert_eq!(
        pg, lite,
        "migrations/postgres and migrations/sqlite have drifted"
    );
}

/// Every table with a tenant_id column, on Postgres, but partitions: they
/// are reached only through their partitioned table, whose policy applies
/// (`postgres_partitions_are_reached_only_through_their_table`).
async fn tenant_tables(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.columns c \
         JOIN pg_class r ON r.oid = format('%I', c.table_name)::regclass \
         WHERE table_schema = 'public' AND column_name = 'tenant_id' AND NOT r.relispartition \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The application role has no privilege on any partition of `events`:
/// it reads and writes through `events`, whose row-level security applies
/// to every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_partitions_are_reached_only_through_their_table() {
    use picket::storage::EventStore;
    let db = TestDb::new(Backend::Postgres).await;
    let s = storage::PgStore::connect(&db.url, 4).await.unwrap();
    let today = Utc::now().date_naive();
    assert_eq!(
        s.prepare_event_days(today, today + chrono::Days::new(1))
            .await
            .unwrap(),
        2
    );
    // Idempotent.
    assert_eq!(s.prepare_event_days(today, today).await.unwrap(), 0);
    let owner = sqlx::PgPool::connect(&db.url).await.unwrap();
    let parts: Vec<String> = sqlx::query_scalar(
        "SELECT relid::regclass::text FROM pg_partition_tree('events') WHERE isleaf ORDER BY 1",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert!(parts.contains(&"events_default".to_string()));
    for p in &parts {
        let may: bool = sqlx::query_scalar(
            "SELECT has_table_privilege('picket_app', $1, 'SELECT,INSERT,UPDATE,DELETE')",
        )
        .bind(p)
        .fetch_one(&owner)
        .await
        .unwrap();
        assert!(!may, "picket_app may use the partition {p} directly");
    }
    let rls: bool =
        sqlx::query_scalar("SELECT relrowsecurity FROM pg_class WHERE oid = 'events'::regclass")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert!(rls);
}

/// A store whose events were written before partitioning keeps every one of
/// them after migration 0010: readable, in the same feed order at the same
/// positions, their keys still rejecting duplicates, and the days the
/// server prepares moved out of the default partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_events_survive_the_partitioning_migration() {
    use picket::domain::event::{EventQuery, FeedPosition, InsertOutcome, idempotency_digest};
    let db = TestDb::new(Backend::Postgres).await;
    let owner = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut before = sqlx::migrate!("./migrations/postgres");
    before.migrations = std::borrow::Cow::Owned(
        before
            .migrations
            .iter()
            .filter(|m| m.version < 10)
            .cloned()
            .collect(),
    );
    before.run(&owner).await.unwrap();
    let a = tenant("a");
    let t = a.id.0;
    sqlx::query(
        "INSERT INTO tenants (id, name, display_name, retention_days, created_at) \
         VALUES ($1, 'a', 'a', 0, now())",
    )
    .bind(t)
    .execute(&owner)
    .await
    .unwrap();
    // 60 events, one every 6 hours back from now (15 days), in 3 transactions.
    for batch in 0..3 {
        sqlx::query(
            "INSERT INTO events (tenant_id, id, idem, occurred_at, received_at, event_type, \
             ocsf_class_uid, ocsf_category_uid, actor, action, resource, outcome, severity, \
             source_system, service, environment, details) \
             SELECT $1, gen_random_uuid(), substring(sha256(('old-' || g)::bytea) from 1 for 16), \
                    now() - g * interval '6 hours', now(), 'user.login', 3002, 3, 'x', 'login', \
                    '/login', 1, 2, 'test', 'web', 'prod', \
                    jsonb_build_object('idempotency_key', 'old-' || g) \
             FROM generate_series($2::int, $2::int + 19) AS g",
        )
        .bind(t)
        .bind(batch * 20)
        .execute(&owner)
        .await
        .unwrap();
    }
    let old: Vec<(uuid::Uuid, String, i64)> =
        sqlx::query_as("SELECT id, xid::text, seq FROM events ORDER BY xid, seq")
            .fetch_all(&owner)
            .await
            .unwrap();
    assert_eq!(old.len(), 60);

    // Migration 0010, then the days a server prepares.
    let s = storage::connect(&db.url, 4).await.unwrap();
    picket::ingest::retention::prepare_partitions(s.as_ref(), Utc::now())
        .await
        .unwrap();
    db.feeds_settled().await;
    let feed = s
        .events_after(a.id, FeedPosition::default(), 1000)
        .await
        .unwrap();
    let now: Vec<(uuid::Uuid, String, i64)> = feed
        .iter()
        .map(|e| (e.event.id, e.position.xid.to_string(), e.position.seq))
        .collect();
    assert_eq!(now, old, "feed order and positions kept");
    let all = s
        .query_events(
            a.id,
            &EventQuery {
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 60);
    // The last 7 days (and today) are in day partitions now; older ones stay
    // in the default partition.
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM events_default")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert!(in_default > 0 && in_default < 60, "{in_default}");
    // An old key still rejects its duplicate; new events continue the feed.
    let mut dup = all[0].event.clone();
    let original = dup.id;
    dup.id = uuid::Uuid::now_v7();
    dup.occurred_at = Utc::now();
    assert_eq!(
        dup.idempotency_digest,
        idempotency_digest(&dup.details.idempotency_key)
    );
    let out = s
        .insert_events(&[(a.id, std::slice::from_ref(&dup))])
        .await
        .unwrap();
    assert_eq!(out[0], vec![InsertOutcome::Duplicate(original)]);
    dup.idempotency_digest = idempotency_digest("new-0");
    let out = s
        .insert_events(&[(a.id, std::slice::from_ref(&dup))])
        .await
        .unwrap();
    assert_eq!(out[0], vec![InsertOutcome::Accepted(dup.id)]);
    db.feeds_settled().await;
    let more = s
        .events_after(a.id, feed.last().unwrap().position, 10)
        .await
        .unwrap();
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].event.id, dup.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_row_level_security_confines_the_app_role() {
    let db = TestDb::new(Backend::Postgres).await;
    let s = storage::PgStore::connect(&db.url, 4).await.unwrap();
    let a = tenant("a");
    let b = tenant("b");
    s.create_tenant(&a).await.unwrap();
    s.create_tenant(&b).await.unwrap();
    s.create_api_key(&key(a.id, "00000000000000a1", 0))
        .await
        .unwrap();
    s.create_api_key(&key(b.id, "00000000000000b1", 0))
        .await
        .unwrap();
    for (t, name) in [(a.id, "a-hook"), (b.id, "b-hook")] {
        let w = source(t, name);
        s.create_webhook_source(&w).await.unwrap();
        s.raise_webhook_alert(
            t,
            w.id,
            Some("d1"),
            webhook_alert(name, "10.0.0.1"),
            Duration::minutes(1),
            Utc::now(),
        )
        .await
        .unwrap();
    }

    for t in [a.id, b.id] {
        use picket::domain::decision::{DecisionKind, DecisionScope};
        use picket::storage::DecisionStore;
        let now = Utc::now();
        let d = decisions::decision(
            t,
            DecisionScope::Ip,
            "192.0.2.1",
            DecisionKind::Ban,
            60,
            now,
        );
        s.create_decisions(t, vec![d], 100, now).await.unwrap();
    }

    let owner = sqlx::PgPool::connect(&db.url).await.unwrap();
    let tables = tenant_tables(&owner).await;
    for t in [
        "api_keys",
        "webhook_sources",
        "webhook_deliveries",
        "decisions",
        "decision_targets",
        "decision_log",
        "decision_heads",
    ] {
        assert!(tables.contains(&t.to_string()), "{t}");
    }

    // Every tenant-owned table has RLS enabled.
    for t in &tables {
        let enabled: bool =
            sqlx::query_scalar("SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass")
                .bind(t)
                .fetch_one(&owner)
                .await
                .unwrap();
        assert!(enabled, "table {t} has no row-level security");
    }
    // The application role can neither bypass RLS nor escape it as superuser.
    let (superuser, bypass): (bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'picket_app'")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert!(!superuser && !bypass);

    // The store's own pool runs as picket_app: with tenant A's setting, a query
    // with no tenant filter sees only A's rows, on every tenant table.
    let pool = s.pool();
    for t in &tables {
        let mut tx = pool.begin().await.unwrap();
        let role: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(role, "picket_app");
        sqlx::query("SELECT set_config('picket.tenant_id', $1, true)")
            .bind(a.id.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        let seen: Vec<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT DISTINCT tenant_id FROM {t}"
        )))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert!(
            !seen.contains(&b.id.0),
            "tenant B's rows visible in {t} under tenant A"
        );
        tx.rollback().await.unwrap();

        // With no tenant setting, nothing is visible at all.
        let mut tx = pool.begin().await.unwrap();
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {t}")))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0, "rows of {t} visible without a tenant setting");
        tx.rollback().await.unwrap();
    }
    // And it cannot write a row for another tenant.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('picket.tenant_id', $1, true)")
        .bind(a.id.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, name, scopes, secret_hash, created_at) VALUES ('00000000000000b9', $1, 'x', 1, '\\x00', now())",
    )
    .bind(b.id.0)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
    drop(tx);
    owner.close().await;
    s.close().await;
}

mod events {
    use super::*;
    use picket::domain::event::{
        EventDetails, EventQuery, FeedPosition, InsertOutcome, NewEvent, Outcome,
        idempotency_digest,
    };

    pub(super) fn event(key: &str, actor: &str, at_s: i64) -> NewEvent {
        NewEvent {
            id: uuid::Uuid::now_v7(),
            idempotency_digest: idempotency_digest(key),
            occurred_at: chrono::DateTime::from_timestamp(1_800_000_000 + at_s, 0).unwrap(),
            received_at: chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros())
                .unwrap(),
            event_type: "user.login".into(),
            ocsf_class_uid: 3002,
            ocsf_category_uid: 3,
            actor: actor.into(),
            action: "login".into(),
            resource: "/login".into(),
            outcome: Outcome::Failure,
            severity: Severity::Medium,
            source_ip: Some("203.0.113.5".parse().unwrap()),
            destination_ip: None,
            source_system: "test".into(),
            service: "web".into(),
            environment: "prod".into(),
            details: EventDetails {
                idempotency_key: key.into(),
                ..Default::default()
            },
        }
    }

    async fn two_tenants(s: &dyn Store) -> (TenantId, TenantId) {
        let a = tenant("a");
        let b = tenant("b");
        s.create_tenant(&a).await.unwrap();
        s.create_tenant(&b).await.unwrap();
        (a.id, b.id)
    }

    pub async fn insert_reports_accepted_and_duplicates(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, b) = two_tenants(s.as_ref()).await;
        let first = vec![
            event("k1", "x", 0),
            event("k2", "x", 1),
            event("k1", "x", 2),
        ];
        let other = vec![event("k1", "y", 0)];
        let out = s.insert_events(&[(a, &first), (b, &other)]).await.unwrap();
        assert_eq!(out[0][0], InsertOutcome::Accepted(first[0].id));
        assert_eq!(out[0][1], InsertOutcome::Accepted(first[1].id));
        assert_eq!(
            out[0][2],
            InsertOutcome::Duplicate(first[0].id),
            "same key later in one batch"
        );
        assert_eq!(
            out[1][0],
            InsertOutcome::Accepted(other[0].id),
            "keys are per tenant"
        );
        let again = vec![event("k2", "x", 5)];
        assert_eq!(
            s.insert_events(&[(a, &again)]).await.unwrap()[0][0],
            InsertOutcome::Duplicate(first[1].id)
        );
        // Stored values round-trip.
        let q = EventQuery {
            limit: 10,
            ..Default::default()
        };
        let rows = s.query_events(a, &q).await.unwrap();
        assert_eq!(rows.len(), 2);
        let stored = rows.iter().find(|r| r.event.id == first[0].id).unwrap();
        assert_eq!(stored.event, first[0]);
        assert_eq!(stored.tenant_id, a);
    }

    pub async fn feed_is_ordered_and_tenant_scoped(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, b) = two_tenants(s.as_ref()).await;
        for i in 0..5 {
            let ea = vec![event(&format!("a{i}"), "x", i)];
            let eb = vec![event(&format!("b{i}"), "y", i)];
            s.insert_events(&[(a, &ea), (b, &eb)]).await.unwrap();
        }
        // On Postgres a commit is readable on the feed once every older
        // transaction of the cluster has ended; another test's may be open.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let all = loop {
            let all = s
                .events_after(a, FeedPosition::default(), 100)
                .await
                .unwrap();
            if all.len() == 5 || std::time::Instant::now() > deadline {
                break all;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(all.len(), 5);
        assert!(all.iter().all(|e| e.tenant_id == a));
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
        let keys: Vec<_> = all
            .iter()
            .map(|e| e.event.details.idempotency_key.clone())
            .collect();
        assert_eq!(keys, ["a0", "a1", "a2", "a3", "a4"]);
        let rest = s.events_after(a, all[1].position, 2).await.unwrap();
        assert_eq!(
            rest.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![all[2].position, all[3].position]
        );
        assert_eq!(s.events_head(a).await.unwrap(), Some(all[4].position));
        let c = tenant("c");
        s.create_tenant(&c).await.unwrap();
        assert_eq!(s.events_head(c.id).await.unwrap(), None);
    }

    pub async fn query_pages_and_purge(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, _) = two_tenants(s.as_ref()).await;
        let evs: Vec<_> = (0..10)
            .map(|i| event(&format!("p{i}"), if i < 4 { "x" } else { "y" }, i))
            .collect();
        s.insert_events(&[(a, &evs)]).await.unwrap();
        let mut q = EventQuery {
            limit: 3,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = s.query_events(a, &q).await.unwrap();
            if page.is_empty() {
                break;
            }
            let last = &page[page.len() - 1].event;
            q.before = Some((last.occurred_at, last.id));
            seen.extend(page.into_iter().map(|r| r.event.details.idempotency_key));
        }
        assert_eq!(
            seen,
            (0..10).rev().map(|i| format!("p{i}")).collect::<Vec<_>>()
        );
        let x = EventQuery {
            actor: Some("x".into()),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(s.query_events(a, &x).await.unwrap().len(), 4);
        let purged = s.purge_events(a, evs[4].occurred_at).await.unwrap();
        assert_eq!(purged, 4);
        assert_eq!(
            s.query_events(
                a,
                &EventQuery {
                    limit: 100,
                    ..Default::default()
                }
            )
            .await
            .unwrap()
            .len(),
            6
        );
    }

    /// The oldest-first keyset the audit export pages with: ascending by
    /// (occurred_at, id), strictly after `after`, ties broken by id.
    pub async fn query_pages_oldest_first(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, b) = two_tenants(s.as_ref()).await;
        // Two events per second for five seconds: every second is a tie.
        let evs: Vec<_> = (0..10)
            .map(|i| event(&format!("o{i}"), "x", i / 2))
            .collect();
        let theirs = vec![event("t0", "x", 0)];
        s.insert_events(&[(a, &evs), (b, &theirs)]).await.unwrap();
        let mut expected: Vec<_> = evs.iter().map(|e| (e.occurred_at, e.id)).collect();
        expected.sort();
        let mut q = EventQuery {
            start: Some(evs[2].occurred_at),
            end: Some(evs[8].occurred_at),
            oldest_first: true,
            limit: 3,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = s.query_events(a, &q).await.unwrap();
            let Some(last) = page.last() else { break };
            q.after = Some((last.event.occurred_at, last.event.id));
            seen.extend(page.iter().map(|r| (r.event.occurred_at, r.event.id)));
        }
        // [second 1, second 4): events 2..8 in (occurred_at, id) order.
        assert_eq!(seen, expected[2..8]);
    }

    /// `key` of `actor` at `at`.
    fn event_at(key: &str, actor: &str, at: chrono::DateTime<Utc>) -> NewEvent {
        NewEvent {
            occurred_at: chrono::DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap(),
            ..event(key, actor, 0)
        }
    }

    /// Idempotency holds across days: on Postgres the two events fall in
    /// different day partitions, where a unique index of the partitioned
    /// table (which must contain `occurred_at`) could not see the first.
    pub async fn a_duplicate_days_later_is_rejected(backend: Backend) {
        let (s, _db) = store(backend).await;
        let now = Utc::now();
        s.prepare_event_days(now.date_naive() - chrono::Days::new(7), now.date_naive())
            .await
            .unwrap();
        let (a, b) = two_tenants(s.as_ref()).await;
        let first = event_at("k-days", "x", now - Duration::days(3));
        let out = s
            .insert_events(&[(a, std::slice::from_ref(&first))])
            .await
            .unwrap();
        assert_eq!(out[0], vec![InsertOutcome::Accepted(first.id)]);
        // The same key, days later (a retry with a later time), twice in one
        // batch, and once more in a batch of its own.
        let later = event_at("k-days", "x", now);
        let again = event_at("k-days", "x", now - Duration::days(1));
        let fresh = event_at("k-new", "x", now);
        let out = s
            .insert_events(&[(a, &[later.clone(), fresh.clone(), again.clone()])])
            .await
            .unwrap();
        assert_eq!(
            out[0],
            vec![
                InsertOutcome::Duplicate(first.id),
                InsertOutcome::Accepted(fresh.id),
                InsertOutcome::Duplicate(first.id),
            ]
        );
        let out = s
            .insert_events(&[(a, std::slice::from_ref(&later))])
            .await
            .unwrap();
        assert_eq!(out[0], vec![InsertOutcome::Duplicate(first.id)]);
        // Another tenant's key space is its own.
        let theirs = event_at("k-days", "x", now);
        let out = s
            .insert_events(&[(b, std::slice::from_ref(&theirs))])
            .await
            .unwrap();
        assert_eq!(out[0], vec![InsertOutcome::Accepted(theirs.id)]);
        let all = s
            .query_events(
                a,
                &EventQuery {
                    limit: 100,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(all.len(), 2);
        // Purging the event frees its key: the store accepts it again.
        s.purge_events(a, now - Duration::days(2)).await.unwrap();
        let out = s
            .insert_events(&[(a, std::slice::from_ref(&later))])
            .await
            .unwrap();
        assert_eq!(out[0], vec![InsertOutcome::Accepted(later.id)]);
    }

    /// Retention removes exactly what each tenant no longer keeps. On
    /// Postgres a day partition holding only expired events goes whole; a
    /// day still kept by one tenant stays and the others' rows in it are
    /// deleted; SQLite deletes rows. Both end with the same events.
    pub async fn retention_drops_days_nobody_keeps(backend: Backend) {
        let (s, _db) = store(backend).await;
        let now = Utc::now();
        let today = now.date_naive();
        s.prepare_event_days(today - chrono::Days::new(7), today)
            .await
            .unwrap();
        let mut short = tenant("short");
        short.retention_days = 2;
        let mut forever = tenant("forever");
        forever.retention_days = 0;
        let mut mid = tenant("mid");
        mid.retention_days = 5;
        for t in [&short, &forever, &mid] {
            s.create_tenant(t).await.unwrap();
        }
        let day = |n: i64| now - Duration::days(n);
        let put = |t: TenantId, evs: Vec<NewEvent>| {
            let s = s.clone();
            async move { s.insert_events(&[(t, &evs)]).await.unwrap() }
        };
        put(
            short.id,
            vec![
                event_at("s4", "x", day(4)),
                event_at("s3", "x", day(3)),
                event_at("s1", "x", day(1)),
            ],
        )
        .await;
        // Ten days back is before the partitions: the default partition.
        put(
            forever.id,
            vec![event_at("f10", "x", day(10)), event_at("f4", "x", day(4))],
        )
        .await;
        put(
            mid.id,
            vec![event_at("m6", "x", day(6)), event_at("m3", "x", day(3))],
        )
        .await;

        let pass = picket::ingest::retention::run_once(s.as_ref(), now)
            .await
            .unwrap();
        assert_eq!(pass.removed(), 3, "{pass:?}");
        let keys = |t: TenantId| {
            let s = s.clone();
            async move {
                let mut k: Vec<String> = s
                    .query_events(
                        t,
                        &EventQuery {
                            limit: 100,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| e.event.details.idempotency_key)
                    .collect();
                k.sort();
                k
            }
        };
        assert_eq!(keys(short.id).await, ["s1"]);
        assert_eq!(keys(forever.id).await, ["f10", "f4"]);
        assert_eq!(keys(mid.id).await, ["m3"]);
        match backend {
            Backend::Postgres => {
                // Day -6 held only an expired event: dropped whole. Days -4
                // (kept by `forever`) and -3 (kept by `mid`) stay.
                assert!(pass.dropped_days.contains(&day(6).date_naive()), "{pass:?}");
                assert!(
                    !pass.dropped_days.contains(&day(4).date_naive()),
                    "{pass:?}"
                );
                assert!(
                    !pass.dropped_days.contains(&day(3).date_naive()),
                    "{pass:?}"
                );
                assert_eq!(pass.dropped_events, 1, "{pass:?}");
                assert_eq!(pass.deleted, 2, "{pass:?}");
            }
            Backend::Sqlite => {
                assert!(pass.dropped_days.is_empty());
                assert_eq!(pass.deleted, 3);
            }
        }
        // The keys of removed events are gone with them.
        let out = s
            .insert_events(&[(mid.id, &[event_at("m6", "x", day(6))])])
            .await
            .unwrap();
        assert!(matches!(out[0][0], InsertOutcome::Accepted(_)), "{out:?}");
        // A second pass finds nothing more to remove.
        let pass = picket::ingest::retention::run_once(s.as_ref(), now)
            .await
            .unwrap();
        assert_eq!(
            pass.removed(),
            1,
            "only the event just re-inserted: {pass:?}"
        );
    }

    /// Every EventFilter field is answered from its own index: the store's
    /// plan for a selective filter names the index and scans no table.
    pub async fn every_filter_reads_an_index(backend: Backend) {
        let (s, db) = store(backend).await;
        let now = Utc::now();
        s.prepare_event_days(
            now.date_naive() - chrono::Days::new(1),
            now.date_naive() + chrono::Days::new(1),
        )
        .await
        .unwrap();
        let (a, _) = two_tenants(s.as_ref()).await;
        let evs: Vec<NewEvent> = (0..3000)
            .map(|i| {
                let mut e = event_at(
                    &format!("f{i}"),
                    &format!("user{}", i % 500),
                    now - Duration::seconds(i),
                );
                e.resource = format!("svc{}/api", i % 500);
                e.source_ip = Some(format!("10.0.{}.{}", i % 250, i % 2).parse().unwrap());
                e.event_type = if i % 500 == 0 {
                    "rare.type".into()
                } else {
                    "http_request".into()
                };
                e.outcome = if i % 500 == 0 {
                    Outcome::Unknown
                } else {
                    Outcome::Success
                };
                e
            })
            .collect();
        for chunk in evs.chunks(1000) {
            s.insert_events(&[(a, chunk)]).await.unwrap();
        }
        db.analyze().await;
        s.refresh_statistics().await.unwrap();
        // The last hour: the days holding the events, not the (empty)
        // default partition.
        let range = Some(now - Duration::hours(1));
        let cases: Vec<(&str, EventQuery)> = vec![
            (
                "actor",
                EventQuery {
                    actor: Some("user7".into()),
                    ..Default::default()
                },
            ),
            (
                "source_ip",
                EventQuery {
                    source_ip: Some("10.0.7.1".parse().unwrap()),
                    ..Default::default()
                },
            ),
            (
                "event_type",
                EventQuery {
                    event_types: vec!["rare.type".into()],
                    ..Default::default()
                },
            ),
            // A whole first segment reads the segment's index (page order
            // within the segment); any other prefix is a range of resources.
            (
                "resource_segment",
                EventQuery {
                    resource_prefix: Some("svc7/".into()),
                    ..Default::default()
                },
            ),
            (
                "resource",
                EventQuery {
                    resource_prefix: Some("svc7/a".into()),
                    ..Default::default()
                },
            ),
            (
                "resource",
                EventQuery {
                    resource_prefix: Some("svc7".into()),
                    ..Default::default()
                },
            ),
            (
                "outcome",
                EventQuery {
                    outcome: Some(Outcome::Unknown),
                    ..Default::default()
                },
            ),
        ];
        for (index, q) in cases {
            let q = EventQuery {
                start: range,
                end: Some(now + Duration::seconds(1)),
                limit: 101,
                ..q
            };
            let plan = s.explain_query_events(a, &q).await.unwrap().join("\n");
            // An index condition on the filter's column, and no table scan
            // (on SQLite with the statistics its maintenance task keeps).
            // SQLite's bounded statistics have no sample inside a range of
            // resources, and it may prefer the time index (page order, no
            // sort) for a prefix that is not a whole segment: still a
            // SEARCH of an index, never a SCAN.
            let sqlite_range = matches!(backend, Backend::Sqlite)
                && index == "resource"
                && plan.contains("USING INDEX")
                && !plan.lines().any(|l| l.trim_start().starts_with("SCAN"));
            assert!(
                storage::plan_reads_index(&plan, index) || sqlite_range,
                "{index}:\n{plan}"
            );
            // And the answer is right.
            let got = s.query_events(a, &q).await.unwrap();
            let want = evs.iter().filter(|e| q.matches(e)).count();
            assert_eq!(got.len(), want.min(101), "{index}");
            assert!(got.iter().all(|e| q.matches(&e.event)), "{index}");
        }
    }

    /// The report aggregates decode the same on both backends (64-bit
    /// counts, times, bucket indexes), place an event exactly on a bucket
    /// start in that bucket, leave the range end out, answer an empty tenant
    /// with no rows, and never count another tenant's events.
    pub async fn report_aggregates_agree(backend: Backend) {
        use picket::domain::report::{AccessGrouping, AccessQuery, ReportRange};
        let (s, _db) = store(backend).await;
        let (a, b) = two_tenants(s.as_ref()).await;
        let start = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let range = ReportRange::new(start, start + Duration::seconds(120), "r").unwrap();
        let width = 60_000_000;
        assert!(s.event_counts(a, range, width).await.unwrap().is_empty());
        // At 0 s (bucket 0), 59.999999 s (bucket 0), 60 s (bucket 1), 120 s (out).
        let mut evs = vec![
            event("e0", "x", 0),
            event("e1", "x", 0),
            event("e2", "y", 60),
        ];
        evs[1].occurred_at += Duration::microseconds(59_999_999);
        evs.push(event("e3", "x", 120));
        s.insert_events(&[(a, &evs), (b, &evs)]).await.unwrap();
        let counts = s.event_counts(a, range, width).await.unwrap();
        let got: Vec<(usize, u64, u64, u64)> = counts
            .iter()
            .map(|(i, c)| (*i, c.events, c.failed_logins, c.by_severity.medium))
            .collect();
        assert_eq!(got, vec![(0, 2, 2, 2), (1, 1, 1, 1)]);
        let rows = s
            .access_report(
                a,
                &AccessQuery {
                    range,
                    grouping: AccessGrouping::ActorResourceAction,
                    actor: None,
                    event_types: Vec::new(),
                    resource_prefix: None,
                    received_before: Utc::now() + Duration::seconds(1),
                    after: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].key.actor.as_str(), rows[0].count, rows[0].failures),
            ("x", 2, 2)
        );
        assert_eq!(rows[0].first_seen, evs[0].occurred_at);
        assert_eq!(rows[0].last_seen, evs[1].occurred_at);
        assert_eq!(
            (rows[0].distinct_resources, rows[0].distinct_source_ips),
            (1, 1)
        );
        let (open, histories) = s.incident_histories(a, range, 10).await.unwrap();
        assert_eq!((open, histories.len()), (0, 0));
        assert!(s.alert_counts(a, range, width).await.unwrap().is_empty());
        assert!(s.top_alert_entities(a, range, 10).await.unwrap().is_empty());
    }

    /// The access report pages over many actors in byte order (upper case,
    /// lower case, non-ASCII), whole and exact whatever the page size: a page
    /// is built from the range's first actors after its key, taken a few at
    /// a time through the actor index, so pages span several such rounds,
    /// skip actors whose events the filter drops, and leave out events
    /// outside the range.
    pub async fn access_report_pages_over_many_actors(backend: Backend) {
        use picket::domain::report::{AccessGrouping, AccessQuery, ReportRange};
        let (s, _db) = store(backend).await;
        let (a, b) = two_tenants(s.as_ref()).await;
        let start = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let range = ReportRange::new(start, start + Duration::seconds(3600), "r").unwrap();
        let mut evs = Vec::new();
        let mut actors = Vec::new();
        for i in 0..70 {
            let actor = match i % 3 {
                0 => format!("U{i:02}"),
                1 => format!("u{i:02}"),
                _ => format!("\u{e9}{i:02}"),
            };
            for k in 0..(1 + i % 3) {
                let mut e = event(&format!("m{i}-{k}"), &actor, 60 * k as i64);
                e.source_ip = Some(format!("10.0.{k}.{i}").parse().unwrap());
                if i % 7 == 0 {
                    // Dropped by the event type filter below.
                    e.event_type = "api.call".into();
                }
                evs.push(e);
            }
            // Outside the range: never counted.
            evs.push(event(&format!("late{i}"), &actor, 3600));
            actors.push(actor);
        }
        s.insert_events(&[(a, &evs)]).await.unwrap();
        s.insert_events(&[(b, &evs[..5])]).await.unwrap();
        for (types, want_actors) in [
            (Vec::new(), (0..70).collect::<Vec<_>>()),
            (
                vec!["user.login".to_string()],
                (0..70).filter(|i| i % 7 != 0).collect(),
            ),
        ] {
            // Expected rows, (actor, ip) in byte order.
            let mut want: Vec<(String, String)> = want_actors
                .iter()
                .flat_map(|i| (0..(1 + i % 3)).map(move |k| (*i, format!("10.0.{k}.{i}"))))
                .map(|(i, ip)| (actors[i].clone(), ip))
                .collect();
            want.sort_by(|x, y| {
                (x.0.as_bytes(), x.1.as_bytes()).cmp(&(y.0.as_bytes(), y.1.as_bytes()))
            });
            for page in [1, 7, 40, 500] {
                let mut got = Vec::new();
                let mut after = None;
                loop {
                    let q = AccessQuery {
                        range,
                        grouping: AccessGrouping::ActorSourceIp,
                        actor: None,
                        event_types: types.clone(),
                        resource_prefix: None,
                        received_before: Utc::now() + Duration::seconds(1),
                        after: after.clone(),
                        limit: page,
                    };
                    let (rows, next) = picket::reports::access_report(s.as_ref(), a, &q)
                        .await
                        .unwrap();
                    assert!(rows.len() <= page as usize);
                    assert!(rows.iter().all(|r| r.count == 1 && r.failures == 1));
                    got.extend(rows.into_iter().map(|r| (r.key.actor, r.key.a)));
                    match next {
                        Some(k) => after = Some(k),
                        None => break,
                    }
                }
                assert_eq!(got, want, "page size {page}, types {types:?}");
            }
        }
    }

    /// Events of every class the reports count, over three days (plus VPN
    /// connects 40 and 20 days before), from a fixed pseudo-random sequence.
    fn report_events(seed: u64, n: usize, base_s: i64, span_s: i64) -> Vec<NewEvent> {
        let mut x = seed;
        let mut next = move |m: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % m
        };
        (0..n)
            .map(|i| {
                let actor = format!("u{}", next(4));
                let at = base_s + next(span_s as u64) as i64;
                let mut e = event(&format!("r{seed}-{i}"), &actor, at);
                e.occurred_at += Duration::microseconds(next(1_000_000) as i64);
                e.severity = [
                    Severity::Info,
                    Severity::Low,
                    Severity::Medium,
                    Severity::High,
                    Severity::Critical,
                ][next(5) as usize];
                e.source_ip = Some(
                    format!("198.51.{}.{}", next(3), 1 + next(9))
                        .parse()
                        .unwrap(),
                );
                match next(6) {
                    0 => {
                        e.outcome = Outcome::Success;
                    }
                    1 | 2 => {
                        e.event_type = "vpn.connect".into();
                        e.ocsf_class_uid = 4001;
                        e.outcome = Outcome::Success;
                    }
                    3 => {
                        e.event_type = "vpn.disconnect".into();
                        e.ocsf_class_uid = 4001;
                        e.outcome = Outcome::Success;
                    }
                    4 => {
                        e.event_type = "api.call".into();
                        e.ocsf_class_uid = 6003;
                        e.outcome = Outcome::Success;
                    }
                    _ => {
                        e.event_type = "firewall.rule_changed".into();
                        e.ocsf_class_uid = 6003;
                        e.outcome = Outcome::Success;
                    }
                }
                e
            })
            .collect()
    }

    /// Everything the reports read from the event rollups, for `t`.
    async fn report_figures(s: &dyn Store, t: TenantId, with_networks: bool) -> Vec<String> {
        use picket::domain::report::ReportRange;
        let day = 86_400;
        let at = |sec: i64| chrono::DateTime::from_timestamp(1_800_000_000 + sec, 0).unwrap();
        let range = |a: i64, b: i64| ReportRange::new(at(a), at(b), "r").unwrap();
        let hour_us = 3_600_000_000;
        let asks = [
            // Hourly buckets from midnight over the three days and a half.
            (range(-4 * 3600, 3 * day + 12 * 3600), hour_us),
            // One bucket, off the hour at both ends.
            (range(1234, 2 * day + 777), 2 * day * 1_000_000),
            // Six-hour buckets off the hour (all raw).
            (range(1800, 2 * day + 1800), 6 * hour_us),
            // Daily buckets.
            (range(-4 * 3600, 4 * day - 4 * 3600), day * 1_000_000),
            // One hour inside the data.
            (range(day, day + 3600), hour_us),
        ];
        let mut out = Vec::new();
        for (r, width) in asks {
            out.push(format!("{:?}", s.event_counts(t, r, width).await.unwrap()));
            out.push(format!(
                "{:?}",
                s.vpn_floor_changes(t, r, width).await.unwrap()
            ));
            if with_networks {
                out.push(format!(
                    "{:?}",
                    s.new_vpn_networks(t, r, 100_000).await.unwrap()
                ));
            }
        }
        out
    }

    /// Open VPN connections are floored at zero per actor: an actor whose
    /// first event in the range is a disconnect (a session opened before
    /// it) does not take another actor's connection away. The floor's
    /// correction is the same from raw events and from rollups.
    pub async fn vpn_connections_are_floored_per_actor(backend: Backend) {
        use picket::domain::report::ReportRange;
        let (s, _db) = store(backend).await;
        let (a, _) = two_tenants(s.as_ref()).await;
        let vpn = |key: &str, actor: &str, hour: i64, kind: &str| {
            let mut e = event(key, actor, hour * 3600 + 60);
            e.event_type = kind.into();
            e.ocsf_class_uid = 4001;
            e.outcome = Outcome::Success;
            e
        };
        let evs = vec![
            vpn("w0", "w", 0, "vpn.connect"),
            vpn("v1", "v", 1, "vpn.disconnect"),
            vpn("v2", "v", 2, "vpn.connect"),
            vpn("v3", "v", 3, "vpn.connect"),
            vpn("v5", "v", 5, "vpn.disconnect"),
        ];
        s.insert_events(&[(a, &evs)]).await.unwrap();
        let at = |h: i64| chrono::DateTime::from_timestamp(1_800_000_000 + h * 3600, 0).unwrap();
        let range = ReportRange::new(at(0), at(8), "r").unwrap();
        // v: net -1, +1, +1, -1 in hours 1, 2, 3, 5; floored, hour 1 adds 1.
        let want = vec![(1usize, 1i64)];
        assert_eq!(
            s.vpn_floor_changes(a, range, 3_600_000_000).await.unwrap(),
            want
        );
        while s.roll_up(a, 2).await.unwrap() > 0 {}
        assert_eq!(
            s.vpn_floor_changes(a, range, 3_600_000_000).await.unwrap(),
            want
        );
    }

    /// The report rollups answer exactly what the raw events answer: before
    /// they run, part way, caught up, with events after them (late ones in
    /// rolled hours too), with two replicas rolling up at once, and after
    /// retention deletes rows (tenant `b` holds the same events and is never
    /// rolled up, so it answers from raw events only).
    pub async fn rollups_answer_what_raw_events_answer(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, b) = two_tenants(s.as_ref()).await;
        let day = 86_400;
        let mut batches = vec![
            report_events(1, 300, 0, 3 * day),
            // Old connects: 40 and 20 days before, some networks again.
            report_events(2, 40, -40 * day, day),
            report_events(3, 40, -20 * day, day),
        ];
        for evs in &batches {
            s.insert_events(&[(a, evs), (b, evs)]).await.unwrap();
        }
        let same = |want: Vec<String>, got: Vec<String>, when: &str| {
            assert_eq!(want.len(), got.len());
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(w, g, "{when}: figure {i}");
            }
        };
        let raw = report_figures(s.as_ref(), b, true).await;
        same(
            raw.clone(),
            report_figures(s.as_ref(), a, true).await,
            "no rollup",
        );
        assert!(raw.iter().any(|f| f.contains("events: ")));
        // Part way: 37 events folded.
        assert_eq!(s.roll_up(a, 37).await.unwrap(), 37);
        assert!(s.rollup_position(a).await.unwrap().is_some());
        assert!(s.rollup_position(b).await.unwrap().is_none());
        same(
            raw.clone(),
            report_figures(s.as_ref(), a, true).await,
            "part way",
        );
        // Caught up, by two "replicas" at once.
        let (s1, s2) = (s.clone(), s.clone());
        let racer = |st: Arc<dyn Store>| async move {
            let mut n = 0;
            loop {
                let k = st.roll_up(a, 29).await.unwrap();
                if k == 0 {
                    break n;
                }
                n += k;
            }
        };
        let (n1, n2) = tokio::join!(racer(s1), racer(s2));
        assert!(n1 + n2 >= 380 - 37, "{n1} + {n2}");
        // A replica losing a race may stop early: finish.
        while s.roll_up(a, 1000).await.unwrap() > 0 {}
        same(
            raw.clone(),
            report_figures(s.as_ref(), a, true).await,
            "caught up",
        );
        // Late events in rolled hours and new ones, not rolled up yet.
        batches.push(report_events(4, 120, 0, 3 * day));
        let late = batches.last().unwrap();
        s.insert_events(&[(a, late), (b, late)]).await.unwrap();
        let raw = report_figures(s.as_ref(), b, true).await;
        same(
            raw.clone(),
            report_figures(s.as_ref(), a, true).await,
            "pending",
        );
        while s.roll_up(a, 50).await.unwrap() > 0 {}
        same(
            raw,
            report_figures(s.as_ref(), a, true).await,
            "late caught up",
        );
        // Retention off the hour: the hour it cuts is counted again.
        let cut = chrono::DateTime::from_timestamp(1_800_000_000 + day + 1800, 0).unwrap();
        s.purge_events(a, cut).await.unwrap();
        s.purge_events(b, cut).await.unwrap();
        let raw = report_figures(s.as_ref(), b, false).await;
        same(
            raw.clone(),
            report_figures(s.as_ref(), a, false).await,
            "purged",
        );
        // Deleting again at the same cut changes nothing.
        s.purge_events(a, cut).await.unwrap();
        same(
            raw,
            report_figures(s.as_ref(), a, false).await,
            "purged twice",
        );
    }

    /// The server's statistics refresh analyzes one table per transaction:
    /// while it waits on a table, the tables it already analyzed left it no
    /// xid. (An xid held over a whole round held back the detection feed,
    /// which reads only below the cluster's oldest running xid, for the
    /// round's 3–4 s: issue 12.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_statistics_refresh_holds_no_xid_between_tables() {
        let (s, db) = store(Backend::Postgres).await;
        let busy = chrono::NaiveDate::from_ymd_opt(2020, 1, 2).unwrap();
        let held = chrono::NaiveDate::from_ymd_opt(2020, 1, 3).unwrap();
        s.prepare_event_days(busy, held).await.unwrap();
        let (a, _) = two_tenants(s.as_ref()).await;
        let at = |day: chrono::NaiveDate| day.and_hms_opt(12, 0, 0).unwrap().and_utc();
        let evs: Vec<NewEvent> = (0..4000)
            .map(|i| event_at(&format!("busy{i}"), "x", at(busy)))
            .chain((0..1500).map(|i| event_at(&format!("held{i}"), "x", at(held))))
            .collect();
        for chunk in evs.chunks(1000) {
            s.insert_events(&[(a, chunk)]).await.unwrap();
        }
        let (busy_t, held_t) = ("events_20200102", "events_20200103");
        let owner = sqlx::PgPool::connect(&db.url).await.unwrap();
        // The statistics views see the inserts once their backends report them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let seen: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_user_tables \
                 WHERE relname = ANY($1) AND n_live_tup > 1000",
            )
            .bind(vec![busy_t, held_t])
            .fetch_one(&owner)
            .await
            .unwrap();
            if seen == 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "inserts never reported"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The less busy partition is analyzed after the busier one; hold it.
        let mut locker = owner.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {held_t} IN SHARE UPDATE EXCLUSIVE MODE"
        )))
        .execute(&mut *locker)
        .await
        .unwrap();
        let refresher = s.clone();
        let round = tokio::spawn(async move { refresher.refresh_statistics().await });
        // The round's call waiting on the held table (it gives up after 1 s).
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(900);
        let xid: Option<String> = loop {
            let waiting: Option<Option<String>> = sqlx::query_scalar(
                "SELECT backend_xid::text FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                 AND query LIKE '%picket_analyze_busy_table%'",
            )
            .fetch_optional(&owner)
            .await
            .unwrap();
            if let Some(xid) = waiting {
                break xid;
            }
            assert!(
                std::time::Instant::now() < deadline && !round.is_finished(),
                "the refresh never waited on the held table"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        let analyzed: Option<chrono::DateTime<Utc>> =
            sqlx::query_scalar("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = $1")
                .bind(busy_t)
                .fetch_one(&owner)
                .await
                .unwrap();
        locker.commit().await.unwrap();
        round.await.unwrap().unwrap();
        assert!(
            analyzed.is_some(),
            "the busier partition was not analyzed first"
        );
        assert_eq!(xid, None, "the refresh held an xid while it waited");
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname = ANY($1) AND last_analyze IS NOT NULL",
        )
        .bind(vec![busy_t, held_t])
        .fetch_one(&owner)
        .await
        .unwrap();
        assert_eq!(done, 2, "both partitions analyzed once the lock was gone");
    }

    crate::both_backends!(
        insert_reports_accepted_and_duplicates,
        feed_is_ordered_and_tenant_scoped,
        query_pages_and_purge,
        query_pages_oldest_first,
        a_duplicate_days_later_is_rejected,
        retention_drops_days_nobody_keeps,
        every_filter_reads_an_index,
        report_aggregates_agree,
        access_report_pages_over_many_actors,
        rollups_answer_what_raw_events_answer,
        vpn_connections_are_floored_per_actor,
    );
}

mod decisions {
    use super::*;
    use picket::domain::decision::{
        Decision, DecisionKind, DecisionQuery, DecisionScope, DeltaKind, NewDecision, Origin,
        Target,
    };

    /// A decision on `scope value` made at `now`, lasting `seconds`.
    pub fn decision(
        tenant: TenantId,
        scope: DecisionScope,
        value: &str,
        kind: DecisionKind,
        seconds: i64,
        now: chrono::DateTime<Utc>,
    ) -> Decision {
        NewDecision {
            target: Target::parse(scope, value, "value").unwrap(),
            kind,
            throttle_per_minute: if kind == DecisionKind::Throttle {
                10
            } else {
                0
            },
            origin: Origin::manual("k1"),
            reason: "test".into(),
            duration: Duration::seconds(seconds),
            idempotency_key: None,
        }
        .into_decision(tenant, "k1", now)
    }

    fn now() -> chrono::DateTime<Utc> {
        // Whole microseconds: both backends keep microsecond precision.
        chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
    }

    pub async fn overlapping_decisions_resolve_and_log_dense_revisions(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, b) = (TenantId::new(), TenantId::new());
        let t0 = now();
        let ip = |kind, secs, at| decision(a, DecisionScope::Ip, "203.0.113.7", kind, secs, at);
        let long = ip(DecisionKind::Ban, 3600, t0);
        let w = s
            .create_decisions(a, vec![long.clone()], 100, t0)
            .await
            .unwrap();
        assert_eq!(w.head.revision, 1);
        assert_eq!(w.result, vec![(long.clone(), true)]);
        // A 60 s ban after the 1 h one: logged (the index needs the list) but
        // the effective state is unchanged.
        let short = ip(DecisionKind::Ban, 60, t0 + Duration::seconds(1));
        let w = s
            .create_decisions(a, vec![short.clone()], 100, t0 + Duration::seconds(1))
            .await
            .unwrap();
        assert_eq!(w.head.revision, 2);
        assert_eq!(
            w.targets[0].effective.as_ref().unwrap().decision_id,
            long.id
        );
        // Revoking the long one: the short one decides.
        let w = s
            .revoke_decision(a, long.id, "k2", "oops", t0 + Duration::seconds(2))
            .await
            .unwrap();
        assert_eq!(w.result.revoked_by, "k2");
        assert_eq!(
            w.targets[0].effective.as_ref().unwrap().decision_id,
            short.id
        );
        // Revoking again changes nothing.
        let again = s
            .revoke_decision(a, long.id, "k3", "", t0 + Duration::seconds(3))
            .await
            .unwrap();
        assert_eq!(again.head.revision, 3);
        assert_eq!(again.result.revoked_by, "k2");
        // Another tenant's writes have their own revisions and are invisible here.
        let other = decision(b, DecisionScope::Actor, "eve", DecisionKind::Ban, 60, t0);
        assert_eq!(
            s.create_decisions(b, vec![other.clone()], 100, t0)
                .await
                .unwrap()
                .head
                .revision,
            1
        );
        assert!(matches!(
            s.get_decision(a, other.id).await,
            Err(StoreError::NotFound(_))
        ));
        let log = s.decision_log_after(a, 0, 100).await.unwrap();
        let kinds: Vec<_> = log.iter().map(|e| (e.revision, e.kind)).collect();
        assert_eq!(
            kinds,
            [
                (1, DeltaKind::Added),
                (2, DeltaKind::Unchanged),
                (3, DeltaKind::Updated)
            ]
        );
        assert_eq!(log[2].decisions, vec![short.clone()]);
        assert_eq!(s.decision_log_after(a, 2, 100).await.unwrap().len(), 1);
        let (head, targets) = s.decision_snapshot(a).await.unwrap();
        assert_eq!((head.revision, head.active), (3, 1));
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].effective.as_ref().unwrap().decision_id, short.id);
        let (empty, none) = s.decision_snapshot(TenantId::new()).await.unwrap();
        assert_eq!((empty.revision, none.len()), (0, 0));
        // Listing: active only by default, newest first; filters.
        let q = |f: fn(&mut DecisionQuery)| {
            let mut q = DecisionQuery {
                limit: 10,
                now: Some(t0 + Duration::seconds(3)),
                ..Default::default()
            };
            f(&mut q);
            q
        };
        let ids = |v: Vec<Decision>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list_decisions(a, &q(|_| {})).await.unwrap()),
            [short.id]
        );
        assert_eq!(
            ids(s
                .list_decisions(a, &q(|q| q.include_inactive = true))
                .await
                .unwrap()),
            [short.id, long.id]
        );
        let by_target = q(|q| {
            q.scope = Some(DecisionScope::Ip);
            q.value = Some("203.0.113.7".into());
            q.kinds = vec![DecisionKind::Ban];
            q.origin_id = Some("k1".into());
            q.include_inactive = true;
        });
        assert_eq!(s.list_decisions(a, &by_target).await.unwrap().len(), 2);
        let none = q(|q| q.kinds = vec![DecisionKind::Allow]);
        assert!(s.list_decisions(a, &none).await.unwrap().is_empty());
        // The schedule names both tenants with their next change.
        let schedule = s.decision_schedule().await.unwrap();
        let mine = schedule.iter().find(|x| x.tenant == a).unwrap();
        assert_eq!(mine.next_change_at, Some(short.expires_at));
        assert!(schedule.iter().any(|x| x.tenant == b));
    }

    pub async fn idempotency_keys_and_limits(backend: Backend) {
        let (s, _db) = store(backend).await;
        let a = TenantId::new();
        let t0 = now();
        let mut first = decision(
            a,
            DecisionScope::Cidr,
            "198.51.100.0/24",
            DecisionKind::Ban,
            60,
            t0,
        );
        first.idempotency_key = Some("run:1:step:0".into());
        let mut repeat = decision(
            a,
            DecisionScope::Cidr,
            "198.51.100.0/24",
            DecisionKind::Ban,
            90,
            t0,
        );
        repeat.idempotency_key = first.idempotency_key.clone();
        let w = s
            .create_decisions(a, vec![first.clone(), repeat.clone()], 100, t0)
            .await
            .unwrap();
        assert_eq!(
            w.result,
            vec![(first.clone(), true), (first.clone(), false)]
        );
        let w = s
            .create_decisions(a, vec![repeat.clone()], 100, t0)
            .await
            .unwrap();
        assert_eq!(w.result, vec![(first.clone(), false)]);
        assert_eq!(w.head.revision, 1, "a replay writes nothing");
        let mut other = decision(
            a,
            DecisionScope::Ip,
            "198.51.100.1",
            DecisionKind::Ban,
            60,
            t0,
        );
        other.idempotency_key = first.idempotency_key.clone();
        assert!(matches!(
            s.create_decisions(a, vec![other], 100, t0).await,
            Err(StoreError::Conflict(_))
        ));
        // The tenant cap counts decisions in force; nothing is written past it.
        let batch: Vec<_> = (0..3)
            .map(|i| {
                decision(
                    a,
                    DecisionScope::Actor,
                    &format!("u{i}"),
                    DecisionKind::Ban,
                    60,
                    t0,
                )
            })
            .collect();
        assert!(matches!(
            s.create_decisions(a, batch.clone(), 3, t0).await,
            Err(StoreError::LimitReached(_))
        ));
        assert_eq!(s.decision_snapshot(a).await.unwrap().0.active, 1);
        s.create_decisions(a, batch, 4, t0).await.unwrap();
        // The per-target cap.
        let many: Vec<_> = (0..101)
            .map(|_| decision(a, DecisionScope::Actor, "busy", DecisionKind::Ban, 60, t0))
            .collect();
        assert!(matches!(
            s.create_decisions(a, many, 10_000, t0).await,
            Err(StoreError::LimitReached(_))
        ));
    }

    pub async fn expiry_is_logged_once_even_when_raced(backend: Backend) {
        let (s, _db) = store(backend).await;
        let a = TenantId::new();
        let t0 = now();
        let allow = decision(
            a,
            DecisionScope::Ip,
            "192.0.2.1",
            DecisionKind::Allow,
            10,
            t0,
        );
        let ban = decision(a, DecisionScope::Ip, "192.0.2.1", DecisionKind::Ban, 20, t0);
        let gone = decision(
            a,
            DecisionScope::Actor,
            "mallory",
            DecisionKind::Ban,
            10,
            t0,
        );
        s.create_decisions(a, vec![allow, ban.clone(), gone], 100, t0)
            .await
            .unwrap();
        assert_eq!(
            s.expire_decisions(a, t0 + Duration::seconds(5))
                .await
                .unwrap(),
            0
        );
        // Two replicas expire at once: each change is logged exactly once.
        let at = t0 + Duration::seconds(11);
        let (x, y) = tokio::join!(s.expire_decisions(a, at), s.expire_decisions(a, at));
        assert_eq!(x.unwrap() + y.unwrap(), 2);
        let log = s.decision_log_after(a, 2, 100).await.unwrap();
        let mut kinds: Vec<_> = log.iter().map(|e| (e.target.scope, e.kind)).collect();
        kinds.sort_by_key(|k| k.0);
        assert_eq!(
            kinds,
            [
                (DecisionScope::Ip, DeltaKind::Updated),
                (DecisionScope::Actor, DeltaKind::Expired)
            ]
        );
        let ip = log
            .iter()
            .find(|e| e.target.scope == DecisionScope::Ip)
            .unwrap();
        assert_eq!(
            ip.effective.as_ref().unwrap().decision_id,
            ban.id,
            "the ban shows again"
        );
        let (head, targets) = s.decision_snapshot(a).await.unwrap();
        assert_eq!((head.revision, head.active, targets.len()), (4, 1, 1));
        let mine = s
            .decision_schedule()
            .await
            .unwrap()
            .into_iter()
            .find(|x| x.tenant == a)
            .unwrap();
        assert_eq!(mine.next_change_at, Some(ban.expires_at));
    }

    pub async fn compaction_raises_the_floor_and_drops_old_history(backend: Backend) {
        let (s, _db) = store(backend).await;
        let a = TenantId::new();
        let t0 = now() - Duration::days(40);
        let old = decision(a, DecisionScope::Ip, "192.0.2.9", DecisionKind::Ban, 60, t0);
        s.create_decisions(a, vec![old.clone()], 100, t0)
            .await
            .unwrap();
        let t1 = now();
        let fresh = decision(
            a,
            DecisionScope::Ip,
            "192.0.2.10",
            DecisionKind::Ban,
            600,
            t1,
        );
        s.create_decisions(a, vec![fresh.clone()], 100, t1)
            .await
            .unwrap();
        let head = s
            .compact_decisions(a, t1 - Duration::days(1), t1 - Duration::days(30))
            .await
            .unwrap();
        assert_eq!((head.revision, head.floor), (2, 1));
        let log = s.decision_log_after(a, 0, 10).await.unwrap();
        assert_eq!(log.iter().map(|e| e.revision).collect::<Vec<_>>(), [2]);
        assert!(matches!(
            s.get_decision(a, old.id).await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(s.get_decision(a, fresh.id).await.unwrap(), fresh);
        assert_eq!(s.decision_snapshot(a).await.unwrap().0.floor, 1);
    }

    /// Many writers at once: every reader, reading while they commit, sees
    /// the log as a gapless prefix (revision n+1 is never visible before n),
    /// and the revisions end dense.
    pub async fn concurrent_writes_are_read_in_revision_order(backend: Backend) {
        let (s, _db) = store(backend).await;
        let a = TenantId::new();
        let writers = 6;
        let per = 25;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (s, done) = (s.clone(), done.clone());
            tokio::spawn(async move {
                let mut seen = 0u64;
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::Acquire);
                    let entries = s.decision_log_after(a, seen, 1000).await.unwrap();
                    for e in &entries {
                        assert_eq!(
                            e.revision,
                            seen + 1,
                            "a revision became visible before an older one"
                        );
                        seen = e.revision;
                    }
                    if finished && entries.is_empty() {
                        return seen;
                    }
                }
            })
        };
        let mut tasks = Vec::new();
        for w in 0..writers {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    let t = now();
                    let d = decision(
                        a,
                        DecisionScope::Actor,
                        &format!("w{w}-{i}"),
                        DecisionKind::Ban,
                        600,
                        t,
                    );
                    s.create_decisions(a, vec![d], 10_000, t).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        let seen = reader.await.unwrap();
        assert_eq!(seen, (writers * per) as u64);
        assert_eq!(
            s.decision_snapshot(a).await.unwrap().0.revision,
            (writers * per) as u64
        );
    }

    crate::both_backends!(
        overlapping_decisions_resolve_and_log_dense_revisions,
        idempotency_keys_and_limits,
        expiry_is_logged_once_even_when_raced,
        compaction_raises_the_floor_and_drops_old_history,
        concurrent_writes_are_read_in_revision_order,
    );
}

mod playbooks {
    use super::*;
    use picket::domain::playbook::{
        ActionKind, NotificationSettings, Origin, Playbook, PlaybookDef, PlaybookRun, RunQuery,
        RunStatus, Step, Trigger, resolve_steps,
    };
    use picket::storage::RUNS_STREAM;

    fn now() -> chrono::DateTime<Utc> {
        chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
    }

    fn playbook(tenant: TenantId, name: &str, approval: bool) -> Playbook {
        Playbook {
            tenant_id: Some(tenant),
            id: uuid::Uuid::now_v7(),
            origin: Origin::Tenant,
            version: 1,
            created_at: now(),
            updated_at: now(),
            def: PlaybookDef {
                name: name.into(),
                description: String::new(),
                steps: vec![Step {
                    name: "note".into(),
                    action: ActionKind::NotifyWebhook,
                    params: Default::default(),
                    requires_approval: approval,
                    timeout_seconds: 0,
                    max_attempts: 0,
                }],
                trigger: Trigger::default(),
                enabled: true,
                required_approvals: 0,
            },
        }
    }

    fn run(tenant: TenantId, p: &Playbook, deadline_s: i64) -> PlaybookRun {
        let steps = resolve_steps(&p.def, &Default::default()).unwrap();
        PlaybookRun::new(
            tenant,
            p,
            steps,
            None,
            None,
            "key-a",
            Duration::seconds(deadline_s),
            now(),
        )
    }

    async fn playbooks_are_versioned_and_tenant_scoped(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, b) = (tenant("pa"), tenant("pb"));
        s.create_tenant(&a).await.unwrap();
        s.create_tenant(&b).await.unwrap();
        let p = s
            .create_playbook(&playbook(a.id, "contain", true))
            .await
            .unwrap();
        assert_eq!(s.get_playbook(a.id, p.id).await.unwrap(), p);
        assert!(matches!(
            s.get_playbook(b.id, p.id).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            s.create_playbook(&playbook(a.id, "contain", false)).await,
            Err(StoreError::Conflict(_))
        ));
        s.create_playbook(&playbook(b.id, "contain", false))
            .await
            .unwrap();
        let mut v2 = p.clone();
        v2.def.description = "v2".into();
        let saved = s.update_playbook(&v2).await.unwrap();
        assert_eq!(saved.version, 2);
        // An update at a stale version conflicts.
        assert!(matches!(
            s.update_playbook(&v2).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            s.find_playbook(a.id, "contain")
                .await
                .unwrap()
                .unwrap()
                .def
                .description,
            "v2"
        );
        s.create_playbook(&playbook(a.id, "another", true))
            .await
            .unwrap();
        let names: Vec<String> = s
            .list_playbooks(a.id, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.def.name)
            .collect();
        assert_eq!(names, ["another", "contain"]);
        assert_eq!(
            s.list_playbooks(a.id, Some("another"), 10)
                .await
                .unwrap()
                .len(),
            1
        );
        s.delete_playbook(a.id, p.id).await.unwrap();
        assert!(matches!(
            s.delete_playbook(a.id, p.id).await,
            Err(StoreError::NotFound(_))
        ));
    }

    async fn run_saves_are_conditional_and_logged(backend: Backend) {
        let (s, _db) = store(backend).await;
        let a = tenant("ra");
        s.create_tenant(&a).await.unwrap();
        let p = s.create_playbook(&playbook(a.id, "p", true)).await.unwrap();
        let mut r = run(a.id, &p, 3600);
        r.trigger_key = Some(PlaybookRun::trigger_key(p.id, uuid::Uuid::nil()));
        let r = s.insert_run(&r).await.unwrap();
        assert_eq!(r.version, 1);
        // One automatic run per trigger key.
        let mut again = run(a.id, &p, 3600);
        again.trigger_key = r.trigger_key.clone();
        assert!(matches!(
            s.insert_run(&again).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            s.used_trigger_keys(a.id, &[r.trigger_key.clone().unwrap(), "x".into()])
                .await
                .unwrap(),
            [r.trigger_key.clone().unwrap()]
        );
        let mut approved = r.clone();
        approved.approve("key-b", "", None, now()).unwrap();
        let saved = s
            .save_run(&approved, RunStatus::PendingApproval, None)
            .await
            .unwrap();
        assert_eq!((saved.version, saved.status), (2, RunStatus::Approved));
        // A save at the version read before loses.
        let mut stale = r.clone();
        stale.cancel("key-c", "", now()).unwrap();
        assert!(matches!(
            s.save_run(&stale, RunStatus::PendingApproval, None).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.get_run(a.id, r.id).await.unwrap(), saved);
        // Every state is in the change log, with the status before. A commit
        // is readable on the Postgres log once every older transaction of the
        // cluster has ended (a concurrently running test's may be open).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let log = loop {
            let log = s
                .changes_after(a.id, RUNS_STREAM, Default::default(), 10)
                .await
                .unwrap();
            if log.len() >= 2 || std::time::Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let kinds: Vec<(&str, serde_json::Value)> = log
            .iter()
            .map(|c| (c.kind.as_str(), c.payload["previous_status"].clone()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("created", serde_json::Value::Null),
                ("updated", serde_json::json!("PendingApproval"))
            ]
        );
        let listed = s
            .list_runs(
                a.id,
                &RunQuery {
                    statuses: vec![RunStatus::Approved],
                    playbook_id: Some(p.id),
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        let other = tenant("rb");
        s.create_tenant(&other).await.unwrap();
        assert!(matches!(
            s.get_run(other.id, r.id).await,
            Err(StoreError::NotFound(_))
        ));
    }

    async fn claims_lease_runnable_runs_once(backend: Backend) {
        let (s, _db) = store(backend).await;
        let a = tenant("ca");
        s.create_tenant(&a).await.unwrap();
        let p = s
            .create_playbook(&playbook(a.id, "auto", false))
            .await
            .unwrap();
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(s.insert_run(&run(a.id, &p, 3600)).await.unwrap().id);
        }
        let pending = s
            .create_playbook(&playbook(a.id, "manual", true))
            .await
            .unwrap();
        s.insert_run(&run(a.id, &pending, 3600)).await.unwrap();
        let t0 = now();
        let lease = t0 + Duration::seconds(30);
        // Concurrent claimants never get the same run.
        let (x, y) = tokio::join!(
            s.claim_runs("worker-x", lease, t0, 4),
            s.claim_runs("worker-y", lease, t0, 4)
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        let mut all: Vec<uuid::Uuid> = x.iter().chain(&y).map(|(_, id)| *id).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), x.len() + y.len());
        assert_eq!(all.len(), 6, "the pending run is not runnable");
        assert!(
            s.claim_runs("worker-z", lease, t0, 10)
                .await
                .unwrap()
                .is_empty()
        );
        let (_, first) = x[0];
        assert!(
            s.renew_run_lease(a.id, first, "worker-x", lease)
                .await
                .unwrap()
        );
        assert!(
            !s.renew_run_lease(a.id, first, "worker-y", lease)
                .await
                .unwrap()
        );
        // Saves under a lease need it.
        let r = s.get_run(a.id, first).await.unwrap();
        assert!(matches!(
            s.save_run(&r, RunStatus::Approved, Some("worker-y")).await,
            Err(StoreError::Conflict(_))
        ));
        let r = s
            .save_run(&r, RunStatus::Approved, Some("worker-x"))
            .await
            .unwrap();
        // An expired lease is taken over; a released one at once.
        let later = lease + Duration::seconds(1);
        let taken = s
            .claim_runs("worker-z", later + Duration::seconds(30), later, 10)
            .await
            .unwrap();
        assert_eq!(taken.len(), 6);
        s.release_run_lease(a.id, r.id, "worker-z").await.unwrap();
        let again = s
            .claim_runs("worker-w", later + Duration::seconds(30), later, 10)
            .await
            .unwrap();
        assert_eq!(again, [(a.id, r.id)]);
        // A terminal save gives the lease up.
        let mut done = s.get_run(a.id, r.id).await.unwrap();
        done.finish(RunStatus::Succeeded, String::new(), now());
        s.save_run(&done, RunStatus::Approved, Some("worker-w"))
            .await
            .unwrap();
        assert!(
            !s.renew_run_lease(a.id, r.id, "worker-w", lease)
                .await
                .unwrap()
        );
    }

    async fn due_runs_are_the_pending_past_their_deadline(backend: Backend) {
        let (s, _db) = store(backend).await;
        let (a, b) = (tenant("da"), tenant("db"));
        s.create_tenant(&a).await.unwrap();
        s.create_tenant(&b).await.unwrap();
        let pa = s.create_playbook(&playbook(a.id, "p", true)).await.unwrap();
        let pb_ = s.create_playbook(&playbook(b.id, "p", true)).await.unwrap();
        let soon = s.insert_run(&run(a.id, &pa, 1)).await.unwrap();
        let other = s.insert_run(&run(b.id, &pb_, 1)).await.unwrap();
        s.insert_run(&run(a.id, &pa, 3600)).await.unwrap();
        let mut due = s.due_runs(now() + Duration::seconds(2), 10).await.unwrap();
        due.sort_by_key(|(_, id)| *id);
        let mut want = vec![(a.id, soon.id), (b.id, other.id)];
        want.sort_by_key(|(_, id)| *id);
        assert_eq!(due, want);
        assert!(s.due_runs(now(), 10).await.unwrap().is_empty());
    }

    async fn notification_secrets_first_writer_wins(backend: Backend) {
        let (s, _db) = store(backend).await;
        let a = tenant("na");
        s.create_tenant(&a).await.unwrap();
        assert_eq!(s.get_notification_settings(a.id).await.unwrap(), None);
        let first = s
            .ensure_notification_secret(a.id, b"sealed-1", now())
            .await
            .unwrap();
        let second = s
            .ensure_notification_secret(a.id, b"sealed-2", now())
            .await
            .unwrap();
        assert_eq!(first.sealed_secret.as_deref(), Some(&b"sealed-1"[..]));
        assert_eq!(second, first);
        let mut set = first.clone();
        set.url = "https://hooks.example.com/x".into();
        set.sealed_secret = Some(b"sealed-3".to_vec());
        s.put_notification_settings(&set).await.unwrap();
        assert_eq!(s.get_notification_settings(a.id).await.unwrap(), Some(set));
        let fresh = NotificationSettings {
            tenant_id: TenantId::new(),
            url: String::new(),
            sealed_secret: None,
            secret_rotated_at: None,
            updated_at: now(),
        };
        assert!(matches!(
            s.put_notification_settings(&fresh).await,
            Err(StoreError::NotFound(_))
        ));
    }

    crate::both_backends!(
        playbooks_are_versioned_and_tenant_scoped,
        run_saves_are_conditional_and_logged,
        claims_lease_runnable_runs_once,
        due_runs_are_the_pending_past_their_deadline,
        notification_secrets_first_writer_wins,
    );
}
