//! Replays the fuzz corpora (`fuzz/corpus/<target>/`) through the same entry
//! points the fuzz targets call (`picket::fuzzing`), so `cargo test` on stable
//! checks every committed input, including every input a fuzzer once found,
//! without nightly or cargo-fuzz.
//!
//! `write_seed_corpora` (ignored) writes the seed inputs: real values built
//! with the server's own encoders. Run it after changing a format:
//! `cargo test --test fuzz_corpus -- --ignored write_seed_corpora`.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use picket::domain::event::FeedPosition;
use picket::fuzzing;
use picket::grpc::convert::{keyset_token, timestamp};
use picket::grpc::events::{
    EventPageToken, ExportCursor, encode_cursor, encode_export_cursor, encode_page_token,
};
use picket::grpc::pb;
use picket::webhooks::signature_header;
use prost::Message;
use uuid::Uuid;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, run: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no inputs", dir.display());
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} panics", file.display());
    }
}

#[test]
fn event_corpus_replays() {
    replay("event", fuzzing::event);
}

#[test]
fn webhook_corpus_replays() {
    replay("webhook", fuzzing::webhook);
}

#[test]
fn sigma_rule_corpus_replays() {
    replay("sigma_rule", fuzzing::sigma_rule);
}

#[test]
fn cursor_corpus_replays() {
    replay("cursor", fuzzing::cursor);
}

#[test]
fn playbook_corpus_replays() {
    replay("playbook", fuzzing::playbook);
}

/// The seeds are accepted where they are meant to be: a valid event parses,
/// a signed webhook verifies, a cursor decodes (so the fuzzers start from
/// inputs that reach the whole path, and a format change is noticed here).
#[test]
fn seeds_reach_the_accepting_paths() {
    let now = fuzzing::now();
    let login = std::fs::read(corpus_dir("event").join("seed-login")).unwrap();
    let login = pb::Event::decode(login.as_slice()).unwrap();
    picket::grpc::events::event_from_pb(&login, now, 0).unwrap();

    let hook = std::fs::read(corpus_dir("webhook").join("seed-brute-force")).unwrap();
    let mut parts = hook.splitn(4, |&b| b == b'\n');
    let signature = std::str::from_utf8(parts.next().unwrap()).unwrap();
    let (_, _, body) = (parts.next(), parts.next(), parts.next().unwrap());
    picket::webhooks::verify_signature(
        fuzzing::WEBHOOK_SECRET,
        Some(signature),
        None,
        body,
        false,
        now,
    )
    .unwrap();
    picket::webhooks::parse_payload("hooks", body, now).unwrap();

    let cursor = std::fs::read_to_string(corpus_dir("cursor").join("seed-feed-ev")).unwrap();
    picket::grpc::events::decode_cursor("ev", fuzzing::tenant(), &cursor, "f").unwrap();
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

fn base(t: DateTime<Utc>, event_type: &str, actor: &str) -> pb::Event {
    pb::Event {
        occurred_at: Some(timestamp(t)),
        event_type: event_type.into(),
        idempotency_key: format!("seed-{event_type}"),
        actor: actor.into(),
        source_system: "picket-simulate".into(),
        service: "accounts".into(),
        environment: "production".into(),
        ..Default::default()
    }
}

fn seed_events(now: DateTime<Utc>) {
    let t = now - Duration::hours(1);
    let mut login = base(t, "user.login", "alice@acme.example");
    login.action = "login".into();
    login.resource = "/auth/login".into();
    login.outcome = pb::Outcome::Failure as i32;
    login.source_ip = "203.0.113.7".into();
    login.auth = Some(pb::AuthDetails {
        method: "password".into(),
        mfa_used: false,
        mfa_method: String::new(),
        failure_reason: "bad_password".into(),
        session_id: String::new(),
    });
    write("event", "login", &login.encode_to_vec());

    let mut drop = base(t, "db.drop_table", "mallory");
    drop.action = "drop".into();
    drop.resource = "orders".into();
    drop.severity = pb::Severity::High as i32;
    drop.database = Some(pb::DatabaseDetails {
        system: "postgresql".into(),
        database: "shop".into(),
        db_user: "app".into(),
        operation: "DROP TABLE".into(),
        rows: 12_000,
    });
    write("event", "db-drop", &drop.encode_to_vec());

    let mut http = base(t, "http.request", "svc:web-sync-0");
    http.source_ip = "2001:db8::42".into();
    http.destination_ip = "10.8.0.10".into();
    http.outcome = pb::Outcome::Success as i32;
    http.http = Some(pb::HttpDetails {
        method: "GET".into(),
        path: "/api/v1/orders?limit=10".into(),
        status_code: 200,
        latency_ms: 12.5,
        bytes_in: 312,
        bytes_out: 48_213,
        user_agent: "curl/8.5.0".into(),
        route: "/api/v1/orders".into(),
    });
    http.attributes = [("region", "eu-west-1"), ("trace_id", "4bf92f3577b34da6")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    write("event", "http", &http.encode_to_vec());

    let mut vpn = base(t, "vpn.connect", "bob@acme.example");
    vpn.source_ip = "198.51.100.23".into();
    vpn.network = Some(pb::NetworkDetails {
        source_port: 51_820,
        destination_port: 443,
        protocol: "udp".into(),
        bytes_sent: 1_000_000,
        bytes_received: 2_000_000,
        device: "vpn-gw-1".into(),
        rule_id: "allow-vpn".into(),
    });
    write("event", "vpn", &vpn.encode_to_vec());

    let mut grant = base(t, "iam.role.grant", "root");
    grant.action = "grant".into();
    grant.change = Some(pb::ChangeDetails {
        object_type: "role".into(),
        object_id: "admin".into(),
        old_value: "reader".into(),
        new_value: "admin".into(),
        privilege: "admin".into(),
        target_actor: "eve".into(),
    });
    write("event", "grant", &grant.encode_to_vec());

    let mut quota = base(t, "api.quota_exceeded", "svc:billing-sync-1");
    quota.quota = Some(pb::QuotaDetails {
        limit_name: "requests_per_minute".into(),
        limit: 600.0,
        observed: 1_250.0,
        throttled: true,
    });
    write("event", "quota", &quota.encode_to_vec());

    // Rejected on purpose: a future time, a bad address, a bad type.
    let mut bad = base(now + Duration::days(2), "User Login!", "x");
    bad.source_ip = "999.1.1.1".into();
    bad.outcome = 42;
    write("event", "invalid", &bad.encode_to_vec());
    write("event", "empty", &[]);
}

fn webhook_input(signature: &str, legacy: &str, delivery: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{signature}\n{legacy}\n{delivery}\n").into_bytes();
    out.extend_from_slice(body);
    out
}

fn seed_webhooks(now: DateTime<Utc>) {
    let secret = fuzzing::WEBHOOK_SECRET;
    let t = now.timestamp();
    let brute = serde_json::json!({
        "source": "guardduty",
        "type": "authentication.brute_force",
        "severity": "high",
        "entity": {"kind": "ip", "value": "192.0.2.1"},
        "title": "Brute force from outside",
        "summary": "200 failed logins in 5 minutes",
        "raw": {"finding_id": "abc-123"}
    })
    .to_string()
    .into_bytes();
    let signed = signature_header(secret, t, &brute);
    write(
        "webhook",
        "brute-force",
        &webhook_input(&signed, "", "delivery-0001", &brute),
    );
    let many = serde_json::json!({
        "type": "exfiltration.volume",
        "severity": 4,
        "entities": [{"kind": "user", "value": "alice"}, {"kind": "host", "value": "db-1"}],
        "title": "Large download",
        "raw": [1, 2, 3]
    })
    .to_string()
    .into_bytes();
    let hex = signature_header(secret, t, &many);
    let v1 = hex.split_once(",v1=").unwrap().1;
    let legacy = {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(&many);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    write(
        "webhook",
        "entities-legacy",
        &webhook_input("", &legacy, "d-2", &many),
    );
    let stale = signature_header(secret, t - 600, &many);
    write(
        "webhook",
        "stale-two-v1",
        &webhook_input(&format!("{stale},v1={v1}"), "", "", &many),
    );
    let missing = br#"{"type": "x.y", "severity": "low", "entity": {"kind": "host", "value": "h1"}, "raw": null}"#;
    write(
        "webhook",
        "missing-title",
        &webhook_input(&signature_header(secret, t, missing), "", "", missing),
    );
    write(
        "webhook",
        "malformed",
        &webhook_input("t=abc,v1=zz", "sha256=", "bad id", b"{\"type\": "),
    );
}

fn seed_rules() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yml") {
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            write("sigma_rule", &name, &std::fs::read(&path).unwrap());
        }
    }
    let broken = "title: broken\nid: 11111111-2222-3333-4444-555555555555\nlogsource:\n    product: picket\ndetection:\n    selection:\n        EventType: x\n    condition: nonexistent_selection\n";
    write("sigma_rule", "broken-condition", broken.as_bytes());
    let drop = "title: Table dropped\nid: 0b7f6a52-5d1c-4b8e-9d4e-3f1a2b3c4d5e\nstatus: test\nlogsource:\n    product: picket\n    category: database\n\
         detection:\n    selection:\n        EventType: db.drop_table\n        Outcome|bogus: x\n    condition: selection\nlevel: high\n\
         tags:\n    - attack.impact\n    - attack.t1485\n";
    write("sigma_rule", "bad-modifier", drop.as_bytes());
}

fn seed_cursors(now: DateTime<Utc>) {
    let tenant = fuzzing::tenant();
    let id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0042);
    write("cursor", "keyset", keyset_token(now, id).as_bytes());
    for kind in ["ev", "al", "in", "pr"] {
        let pos = FeedPosition {
            xid: 7_000_123,
            seq: 99,
        };
        write(
            "cursor",
            &format!("feed-{kind}"),
            encode_cursor(kind, tenant, pos).as_bytes(),
        );
    }
    let page = EventPageToken {
        before: (now - Duration::minutes(5), id),
        received_before: now,
    };
    write(
        "cursor",
        "page",
        encode_page_token(tenant, None, None, page).as_bytes(),
    );
    let export = ExportCursor {
        after: (now - Duration::days(3), id),
        received_before: now,
    };
    write(
        "cursor",
        "export",
        encode_export_cursor(tenant, None, None, export).as_bytes(),
    );
    use base64::Engine;
    let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("contain-brute-force");
    write("cursor", "name", name.as_bytes());
}

fn seed_playbooks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        write("playbook", &name, &std::fs::read(&path).unwrap());
    }
    let templates =
        "{{incident.id}} {{ entity.ip }} {{entity.actor}}/{{alert.id}}: {{incident.title}}";
    write("playbook", "templates", templates.as_bytes());
}

#[test]
#[ignore = "writes the seed corpora into fuzz/corpus; run by hand"]
fn write_seed_corpora() {
    let now = fuzzing::now();
    seed_events(now);
    seed_webhooks(now);
    seed_rules();
    seed_cursors(now);
    seed_playbooks();
}
