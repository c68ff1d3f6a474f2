//! Entry points for the fuzz targets in `fuzz/` and for the test that replays
//! their corpora (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and
//! drives the real parsing and validation code with them; none duplicates a
//! rule. A panic is a finding. Besides "does not panic", each checks the
//! properties the parsers promise (a token that decodes re-encodes to the
//! same position; a body signed by [`webhooks::signature_header`] verifies).
//!
//! Inputs are fixed apart from the fuzzed bytes: the clock is [`now`], the
//! tenant is [`tenant`], the webhook secret is [`WEBHOOK_SECRET`], so a run
//! replays exactly.

use chrono::{DateTime, Utc};
use prost::Message;
use uuid::Uuid;

use crate::detect::RuleSet;
use crate::domain::alert::{Entity, EntityKind};
use crate::domain::event::FeedPosition;
use crate::domain::incident::Incident;
use crate::domain::playbook::{self, TemplateContext};
use crate::domain::{Severity, TenantId};
use crate::grpc::events::{
    decode_cursor, decode_export_cursor, decode_page_token, encode_cursor, encode_export_cursor,
    encode_page_token, event_from_pb,
};
use crate::grpc::{convert, pb};
use crate::webhooks;

/// The fixed clock of every target: 2026-01-01T00:00:00Z.
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).expect("a valid time")
}

/// The fixed tenant cursors and page tokens are bound to.
pub fn tenant() -> TenantId {
    TenantId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001))
}

/// The signing secret of the webhook target's source.
pub const WEBHOOK_SECRET: &[u8] = b"whsec_fuzz_0123456789abcdef";

/// The feed kinds cursors are issued for (events, alerts, incidents, runs).
const CURSOR_KINDS: [&str; 4] = ["ev", "al", "in", "pr"];

/// Protobuf `Event` bytes → the domain event: decoding, then the whole
/// validation path of ingest (`event_from_pb`, i.e. `NewEvent::parse`), with
/// no retention limit and with a 30-day one.
pub fn event(data: &[u8]) {
    let Ok(e) = pb::Event::decode(data) else {
        return;
    };
    for retention in [0, 30] {
        if let Ok(ev) = event_from_pb(&e, now(), retention) {
            assert_eq!(ev.received_at, now(), "received_at is the server clock");
            assert!(!ev.event_type.is_empty(), "an accepted event has a type");
        }
    }
}

/// A webhook delivery. The input is four parts separated by `\n`: the
/// `X-Picket-Signature` header, the legacy `X-Signature` header (an empty
/// part is an absent header), the `X-Picket-Delivery` id, then the body.
/// Runs the signature check (header parsing, HMAC, timestamp window) with
/// the body-only form allowed and refused, the delivery id check, and the
/// payload JSON → alert parser; then checks that the body signed now
/// verifies, and signed 301 s ago is stale.
pub fn webhook(data: &[u8]) {
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let signature = parts.next().unwrap_or_default();
    let legacy = parts.next().unwrap_or_default();
    let delivery = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    // Headers reach the handler only as visible ASCII (`HeaderValue::to_str`).
    fn header(b: &[u8]) -> Option<&str> {
        (!b.is_empty())
            .then(|| std::str::from_utf8(b).ok())
            .flatten()
    }
    let (signature, legacy) = (header(signature), header(legacy));
    for allow_body_only in [false, true] {
        let _ = webhooks::verify_signature(
            WEBHOOK_SECRET,
            signature,
            legacy,
            body,
            allow_body_only,
            now(),
        );
    }
    if let Ok(id) = std::str::from_utf8(delivery) {
        let _ = webhooks::check_delivery_id(id);
    }
    if let Ok(alert) = webhooks::parse_payload("fuzz-source", body, now()) {
        assert!(!alert.entities.is_empty(), "an alert names an entity");
        assert!(alert.fingerprint.starts_with("webhook:"));
    }
    let t = now().timestamp();
    let signed = webhooks::signature_header(WEBHOOK_SECRET, t, body);
    assert_eq!(
        webhooks::verify_signature(WEBHOOK_SECRET, Some(&signed), None, body, false, now()),
        Ok(())
    );
    let old = webhooks::signature_header(WEBHOOK_SECRET, t - 301, body);
    assert_eq!(
        webhooks::verify_signature(WEBHOOK_SECRET, Some(&old), None, body, false, now()),
        Err(webhooks::SignatureError::Stale(301))
    );
}

/// Sigma rule text → what `ValidateRule` answers (`RuleSet::validate` against
/// the built-in pack). Every error it reports is placed on a line of the text
/// (or on none).
pub fn sigma_rule(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // An upper bound on the text's lines as YAML counts them (it also breaks
    // lines at CR, NEL, LS and PS), plus one for an error at the end.
    let breaks = text
        .chars()
        .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        .count();
    let lines = u32::try_from(breaks).unwrap_or(u32::MAX).saturating_add(2);
    for e in RuleSet::builtin().validate(text) {
        assert!(
            e.line <= lines,
            "error line {} beyond the text: {e:?}",
            e.line
        );
    }
}

/// Cursors and page tokens (base64 of a dotted text) as every decoder the
/// server has reads them: keyset page tokens, feed cursors of each kind,
/// QueryEvents page tokens, ExportEvents cursors and playbook name tokens.
/// Whatever decodes re-encodes to a token that decodes to the same value.
pub fn cursor(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let tenant = tenant();
    if let Ok((t, id)) = convert::parse_keyset_token(token) {
        let again = convert::keyset_token(t, id);
        assert_eq!(convert::parse_keyset_token(&again).ok(), Some((t, id)));
    }
    for kind in CURSOR_KINDS {
        if let Ok(pos) = decode_cursor(kind, tenant, token, "after_cursor") {
            let again = encode_cursor(kind, tenant, pos);
            assert_eq!(
                decode_cursor(kind, tenant, &again, "after_cursor").ok(),
                Some(pos)
            );
        }
    }
    if let Ok(p) = decode_page_token(tenant, None, None, token) {
        let again = encode_page_token(tenant, None, None, p);
        assert_eq!(decode_page_token(tenant, None, None, &again).ok(), Some(p));
    }
    if let Ok(c) = decode_export_cursor(tenant, None, None, token) {
        let again = encode_export_cursor(tenant, None, None, c);
        assert_eq!(
            decode_export_cursor(tenant, None, None, &again).ok(),
            Some(c)
        );
    }
    if let Ok(name) = crate::grpc::playbooks::parse_name_token(token) {
        let again = crate::grpc::playbooks::name_token(&name);
        assert_eq!(
            crate::grpc::playbooks::parse_name_token(&again).ok(),
            Some(name)
        );
    }
}

/// A feed position's cursor for the seed corpus.
pub fn feed_cursor(kind: &str, xid: u64, seq: i64) -> String {
    encode_cursor(kind, tenant(), FeedPosition { xid, seq })
}

/// Playbook YAML → playbooks (`playbook::yaml::parse`, with its checks and
/// `PlaybookDef::validate`), then each valid playbook's parameter templates
/// (`{{incident.id}}`, `{{entity.ip}}`, …) found and filled in for a run
/// (`resolve_steps`) with an incident and without one. Also the raw text as a
/// single template value.
pub fn playbook(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut incident = Incident::new(
        tenant(),
        "Brute force from 203.0.113.7".into(),
        String::new(),
        Severity::High,
        now(),
    );
    incident.id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00aa);
    incident.entities = vec![
        Entity::new(EntityKind::Ip, "203.0.113.7"),
        Entity::new(EntityKind::Actor, "alice@example.com"),
    ];
    incident.alert_ids = vec![Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00bb)];
    let with = TemplateContext {
        incident: Some(&incident),
        alert: None,
    };
    let without = TemplateContext::default();
    for parsed in playbook::yaml::parse(text) {
        let Ok(def) = parsed else { continue };
        let _ = def.validate("playbook.");
        for ctx in [&with, &without] {
            if let Ok(steps) = playbook::resolve_steps(&def, ctx) {
                assert_eq!(steps.len(), def.steps.len());
                let _ = playbook::params_digest(&steps);
            }
        }
    }
    let templates = playbook::templates_in(text);
    let filled = with.fill(text);
    if templates.is_ok() {
        assert!(filled.is_ok(), "known templates fill in: {filled:?}");
    }
}
