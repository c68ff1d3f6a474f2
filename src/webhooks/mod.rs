//! Signed webhooks: sealing signing secrets at rest, source administration
//! shared by `AdminService` and the CLI, signature verification and the JSON
//! payload that becomes an alert. The HTTP handler is `http::webhooks`.
//!
//! **Secrets.** Verifying an HMAC needs the raw key, so a signing secret cannot
//! be stored as a hash like an API key. It is sealed with XChaCha20-Poly1305
//! under a key derived from the server's key-hashing secret ("pepper") and bound
//! to the source's id (associated data), so a database dump alone does not
//! reveal it and a sealed secret copied onto another source does not open.
//! Whoever holds the pepper and the database can open it; rotating the pepper
//! makes every sealed secret unreadable (rotate the webhook secrets afterwards).

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::access::auth::{self, KeyHasher};
use crate::domain::alert::{Entity, EntityKind, NewAlert, SourceKind};
use crate::domain::webhook::{WebhookSource, WebhookSourceName};
use crate::domain::{Severity, TenantId};
use crate::error::{AppError, AppResult};
use crate::storage::Store;

/// Largest accepted request body, in bytes (larger ones get 413).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Largest accepted difference between a signature's timestamp and the server clock.
pub const MAX_SKEW_SECONDS: i64 = 300;
/// Header of the timestamped signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "x-picket-signature";
/// Header of the legacy body-only signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const LEGACY_SIGNATURE_HEADER: &str = "x-signature";
/// Header carrying the sender's delivery id, deduplicated per source.
pub const DELIVERY_HEADER: &str = "x-picket-delivery";
/// Longest delivery id, in bytes.
const MAX_DELIVERY_ID: usize = 128;
/// Prefix of generated signing secrets.
const SECRET_PREFIX: &str = "whsec_";
/// Format version byte of a sealed secret.
const SEALED_V1: u8 = 1;
/// Label the sealing key is derived under (HMAC of it keyed with the pepper).
const SEALING_KEY_LABEL: &str = "picket/webhook-secret-sealing/v1";

/// Seals and opens webhook signing secrets (see the module header).
#[derive(Clone)]
pub struct SecretBox {
    /// XChaCha20-Poly1305 keyed with HMAC-SHA256(pepper, label).
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox([REDACTED])")
    }
}

impl SecretBox {
    /// A box keyed from the server's key-hashing secret.
    pub fn new(hasher: &KeyHasher) -> Self {
        Self::with_label(hasher, SEALING_KEY_LABEL)
    }

    /// A box keyed from the server's key-hashing secret under another label
    /// (another kind of secret: a sealed value of one kind never opens as the other).
    pub fn with_label(hasher: &KeyHasher, label: &str) -> Self {
        let key = hasher.hash(label);
        Self {
            cipher: XChaCha20Poly1305::new_from_slice(&key).expect("HMAC-SHA256 gives 32 bytes"),
        }
    }

    /// Seals `secret` for source `id`: version byte, 24-byte random nonce, ciphertext + tag.
    pub fn seal(&self, id: Uuid, secret: &str) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: id.as_bytes(),
                },
            )
            .expect("encryption of a short secret cannot fail");
        let mut out = Vec::with_capacity(1 + nonce.len() + sealed.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a secret sealed for source `id`; `None` if it was sealed under
    /// another pepper, for another source, or is corrupt.
    pub fn open(&self, id: Uuid, sealed: &[u8]) -> Option<SecretString> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_V1 || rest.len() < 24 {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(24);
        let plain = self
            .cipher
            .decrypt(
                &XNonce::try_from(nonce).ok()?,
                Payload {
                    msg: ciphertext,
                    aad: id.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok().map(SecretString::from)
    }
}

/// A fresh signing secret: `whsec_` + 32 random bytes in base64url. The HMAC
/// key is the whole string's UTF-8 bytes.
pub fn generate_secret() -> SecretString {
    SecretString::from(format!("{SECRET_PREFIX}{}", auth::random_secret()))
}

/// Creates a source for `tenant`; returns it and its secret (shown once).
pub async fn create_source(
    store: &dyn Store,
    secrets: &SecretBox,
    tenant: TenantId,
    name: &str,
    allow_body_only_signature: bool,
) -> AppResult<(WebhookSource, SecretString)> {
    let name = WebhookSourceName::parse(name, "name")?;
    let now = now_micros();
    let id = Uuid::now_v7();
    let secret = generate_secret();
    let source = WebhookSource {
        tenant_id: tenant,
        id,
        name: name.as_str().to_owned(),
        sealed_secret: secrets.seal(id, secret.expose_secret()),
        allow_body_only_signature,
        created_at: now,
        secret_rotated_at: now,
    };
    store.create_webhook_source(&source).await?;
    tracing::info!(tenant_id = %tenant, source_id = %id, source = %source.name, allow_body_only_signature, "webhook source created");
    Ok((source, secret))
}

/// Now, in whole microseconds (what both backends keep), so the record a call
/// returns equals the one stored.
fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// The tenant that owns source `id`: `restrict` (a tenant admin's own tenant)
/// or, for the operator (`None`), whichever tenant holds it.
async fn owner(store: &dyn Store, restrict: Option<TenantId>, id: Uuid) -> AppResult<TenantId> {
    match restrict {
        Some(t) => Ok(t),
        None => store
            .webhook_source_tenant(id)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("webhook source {id}"))),
    }
}

/// Parses a source id; the error names `field`.
pub fn parse_source_id(s: &str, field: &str) -> AppResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| AppError::invalid(field, "not a webhook source id (UUID)"))
}

/// Replaces a source's secret; the old one stops working at once.
pub async fn rotate_secret(
    store: &dyn Store,
    secrets: &SecretBox,
    restrict: Option<TenantId>,
    id: Uuid,
) -> AppResult<(WebhookSource, SecretString)> {
    let tenant = owner(store, restrict, id).await?;
    let secret = generate_secret();
    let source = store
        .rotate_webhook_secret(
            tenant,
            id,
            &secrets.seal(id, secret.expose_secret()),
            now_micros(),
        )
        .await?;
    tracing::info!(tenant_id = %tenant, source_id = %id, "webhook secret rotated");
    Ok((source, secret))
}

/// Deletes a source; deliveries to it then get 404.
pub async fn delete_source(
    store: &dyn Store,
    restrict: Option<TenantId>,
    id: Uuid,
) -> AppResult<()> {
    let tenant = owner(store, restrict, id).await?;
    store.delete_webhook_source(tenant, id).await?;
    tracing::info!(tenant_id = %tenant, source_id = %id, "webhook source deleted");
    Ok(())
}

/// Why a delivery's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Neither signature header (or only the legacy one, not enabled for the source).
    #[error(
        "missing signature: send X-Picket-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">"
    )]
    Missing,
    /// The legacy header was sent but the source does not accept it.
    #[error(
        "the body-only X-Signature form is not enabled for this source; send X-Picket-Signature"
    )]
    LegacyNotAllowed,
    /// The header is not of the documented form.
    #[error("malformed {0} header")]
    Malformed(&'static str),
    /// The HMAC does not match.
    #[error("signature does not match")]
    Mismatch,
    /// The timestamp is too far from the server clock.
    #[error("signature timestamp is {0} s away from the server clock (at most 300 s accepted)")]
    Stale(i64),
}

/// Verifies a delivery: the timestamped header if present, else the legacy
/// body-only header if `allow_body_only` (replayable: anyone who saw one
/// delivery can resend it; only delivery-id dedupe limits that).
pub fn verify_signature(
    secret: &[u8],
    signature: Option<&str>,
    legacy: Option<&str>,
    body: &[u8],
    allow_body_only: bool,
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    if let Some(header) = signature {
        let mut t = None;
        let mut v1 = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", v)) => t = Some(v),
                Some(("v1", v)) => v1.push(v),
                _ => {}
            }
        }
        let malformed = SignatureError::Malformed("X-Picket-Signature");
        let t_str = t.ok_or(malformed.clone())?;
        let ts: i64 = t_str.parse().map_err(|_| malformed.clone())?;
        if v1.is_empty() {
            return Err(malformed);
        }
        let mut mac = hmac_of(secret);
        mac.update(t_str.as_bytes());
        mac.update(b".");
        mac.update(body);
        let ok = v1
            .iter()
            .any(|v| hex::decode(v).is_ok_and(|sig| mac.clone().verify_slice(&sig).is_ok()));
        if !ok {
            return Err(SignatureError::Mismatch);
        }
        // Checked after the MAC so an unauthenticated sender learns nothing
        // about the clock from the answer.
        let skew = now.timestamp().saturating_sub(ts);
        if skew.abs() > MAX_SKEW_SECONDS {
            return Err(SignatureError::Stale(skew));
        }
        return Ok(());
    }
    let Some(header) = legacy else {
        return Err(SignatureError::Missing);
    };
    if !allow_body_only {
        return Err(SignatureError::LegacyNotAllowed);
    }
    let hex_sig = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed("X-Signature"))?;
    let sig = hex::decode(hex_sig).map_err(|_| SignatureError::Malformed("X-Signature"))?;
    let mut mac = hmac_of(secret);
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| SignatureError::Mismatch)
}

/// The `X-Picket-Signature` value for `body` signed at unix time `t`:
/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, exactly what
/// [`verify_signature`] accepts (Picket signs its outbound notifications so).
pub fn signature_header(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = hmac_of(secret);
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn hmac_of(secret: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(secret)
        .expect("HMAC accepts keys of any length")
}

/// Checks an `X-Picket-Delivery` value: 1..=128 visible ASCII characters.
pub fn check_delivery_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DELIVERY_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "X-Picket-Delivery must be 1 to {MAX_DELIVERY_ID} visible ASCII characters"
        ));
    }
    Ok(())
}

/// Turns a verified delivery's JSON into an alert of source `source_name`.
///
/// Fields: `type` (string, e.g. `authentication.brute_force`; its first dotted
/// segment is the alert's category), `severity` (`info|low|medium|high|critical`
/// or 1..5), `entity` `{kind, value}` or `entities` `[{kind, value}, …]` (kinds
/// `actor|user|ip|service|host|resource`), `title`, optional `summary` and
/// `source` (the sender's own sub-system, prefixed to the summary), and `raw`
/// (any JSON, kept with the alert). Errors name the field.
pub fn parse_payload(
    source_name: &str,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<NewAlert, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err("the body must be a JSON object".into());
    };
    let string = |obj: &serde_json::Map<String, serde_json::Value>,
                  field: &str,
                  max: usize,
                  required: bool|
     -> Result<Option<String>, String> {
        match obj.get(field) {
            None | Some(serde_json::Value::Null) if required => {
                Err(format!("missing field `{field}`"))
            }
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if s.trim().is_empty() && required => {
                Err(format!("field `{field}` must not be empty"))
            }
            Some(serde_json::Value::String(s)) if s.len() > max => {
                Err(format!("field `{field}` is longer than {max} bytes"))
            }
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("field `{field}` must be a string")),
        }
    };
    let event_type = string(&obj, "type", 128, true)?.unwrap_or_default();
    let title = string(&obj, "title", 256, true)?.unwrap_or_default();
    let summary = string(&obj, "summary", 4096, false)?.unwrap_or_default();
    let sender = string(&obj, "source", 128, false)?;
    let severity = match obj.get("severity") {
        None | Some(serde_json::Value::Null) => return Err("missing field `severity`".into()),
        Some(v) => parse_severity(v)
            .ok_or("field `severity` must be one of info, low, medium, high, critical (or 1..5)")?,
    };
    let mut entities = match (obj.get("entity"), obj.get("entities")) {
        (Some(e), None) => vec![parse_entity(e, "entity")?],
        (None, Some(serde_json::Value::Array(list))) if !list.is_empty() => {
            if list.len() > 32 {
                return Err("field `entities` has more than 32 entries".into());
            }
            list.iter()
                .enumerate()
                .map(|(i, e)| parse_entity(e, &format!("entities[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
        }
        (None, Some(serde_json::Value::Array(_))) => {
            return Err("field `entities` must not be empty".into());
        }
        (None, Some(_)) => return Err("field `entities` must be an array".into()),
        (Some(_), Some(_)) => return Err("send either `entity` or `entities`, not both".into()),
        (None, None) => return Err("missing field `entity` (or `entities`)".into()),
    };
    let raw = match obj.remove("raw") {
        None => return Err("missing field `raw`".into()),
        Some(v) => v,
    };
    entities.sort();
    entities.dedup();
    let category = event_type
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut h = Sha256::new();
    h.update(source_name.as_bytes());
    h.update([0]);
    h.update(event_type.as_bytes());
    for e in &entities {
        h.update([0]);
        h.update(format!("{:?}", e.kind).as_bytes());
        h.update([b'=']);
        h.update(e.value.as_bytes());
    }
    let summary = match sender {
        Some(s) if summary.is_empty() => format!("[{s}]"),
        Some(s) => format!("[{s}] {summary}"),
        None => summary,
    };
    Ok(NewAlert {
        title,
        summary,
        severity,
        category,
        source_kind: SourceKind::Webhook,
        source_name: source_name.to_owned(),
        anomaly_score: 0.0,
        anomaly_threshold: 0.0,
        entities,
        evidence: Vec::new(),
        features: Vec::new(),
        attack_techniques: Vec::new(),
        first_seen: now,
        last_seen: now,
        fingerprint: format!("webhook:{}", hex::encode(&h.finalize()[..16])),
        raw: Some(raw),
    })
}

fn parse_severity(v: &serde_json::Value) -> Option<Severity> {
    match v {
        serde_json::Value::String(s) => Some(match s.to_ascii_lowercase().as_str() {
            "info" | "informational" => Severity::Info,
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            _ => return None,
        }),
        serde_json::Value::Number(n) => Severity::from_i16(i16::try_from(n.as_i64()?).ok()?),
        _ => None,
    }
}

fn parse_entity(v: &serde_json::Value, field: &str) -> Result<Entity, String> {
    let serde_json::Value::Object(o) = v else {
        return Err(format!("field `{field}` must be an object {{kind, value}}"));
    };
    let kind = match o.get("kind").and_then(|k| k.as_str()) {
        None => return Err(format!("missing field `{field}.kind`")),
        Some(k) => match k.to_ascii_lowercase().as_str() {
            "actor" | "user" => EntityKind::Actor,
            "ip" => EntityKind::Ip,
            "service" => EntityKind::Service,
            "host" => EntityKind::Host,
            "resource" => EntityKind::Resource,
            _ => {
                return Err(format!(
                    "field `{field}.kind` must be one of actor, user, ip, service, host, resource"
                ));
            }
        },
    };
    match o.get("value").and_then(|k| k.as_str()) {
        None => Err(format!("missing field `{field}.value`")),
        Some("") => Err(format!("field `{field}.value` must not be empty")),
        Some(s) => Ok(Entity::new(kind, s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = hmac_of(secret);
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signed_headers_verify() {
        let now = Utc::now();
        let header = signature_header(b"whsec_x", now.timestamp(), b"{}");
        assert_eq!(
            verify_signature(b"whsec_x", Some(&header), None, b"{}", false, now),
            Ok(())
        );
        assert_eq!(
            verify_signature(b"whsec_y", Some(&header), None, b"{}", false, now),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn sealed_secrets_open_only_for_their_source_and_pepper() {
        let a = SecretBox::new(&KeyHasher::new(SecretString::from("pepper")));
        let b = SecretBox::new(&KeyHasher::new(SecretString::from("other")));
        let id = Uuid::new_v4();
        let sealed = a.seal(id, "whsec_abc");
        assert!(!sealed.windows(9).any(|w| w == b"whsec_abc"));
        assert_eq!(a.open(id, &sealed).unwrap().expose_secret(), "whsec_abc");
        assert!(a.open(Uuid::new_v4(), &sealed).is_none());
        assert!(b.open(id, &sealed).is_none());
        assert!(a.open(id, &sealed[..10]).is_none());
        assert!(!format!("{a:?}").contains("pepper"));
    }

    #[test]
    fn timestamped_signatures_verify_and_expire() {
        let now = Utc::now();
        let body = br#"{"a":1}"#;
        let good = sign(b"k", now.timestamp(), body);
        assert_eq!(
            verify_signature(b"k", Some(&good), None, body, false, now),
            Ok(())
        );
        assert_eq!(
            verify_signature(b"other", Some(&good), None, body, false, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"k", Some(&good), None, b"{}", false, now),
            Err(SignatureError::Mismatch)
        );
        let old = sign(b"k", now.timestamp() - 301, body);
        assert_eq!(
            verify_signature(b"k", Some(&old), None, body, false, now),
            Err(SignatureError::Stale(301))
        );
        assert!(matches!(
            verify_signature(b"k", Some("v1=00"), None, body, false, now),
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            verify_signature(b"k", None, None, body, false, now),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn legacy_signatures_need_the_source_flag() {
        let now = Utc::now();
        let mut mac = hmac_of(b"k");
        mac.update(b"{}");
        let legacy = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            verify_signature(b"k", None, Some(&legacy), b"{}", false, now),
            Err(SignatureError::LegacyNotAllowed)
        );
        assert_eq!(
            verify_signature(b"k", None, Some(&legacy), b"{}", true, now),
            Ok(())
        );
        assert_eq!(
            verify_signature(b"k", None, Some(&legacy), b"{ }", true, now),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn payload_errors_name_the_field() {
        let now = Utc::now();
        let cases: [(&str, &str); 7] = [
            ("{", "malformed JSON"),
            ("[]", "JSON object"),
            (
                r#"{"title":"t","severity":"high","entity":{"kind":"ip","value":"1.2.3.4"},"raw":{}}"#,
                "`type`",
            ),
            (
                r#"{"type":"x","title":"t","entity":{"kind":"ip","value":"1"},"raw":{}}"#,
                "`severity`",
            ),
            (
                r#"{"type":"x","title":"t","severity":"bad","entity":{"kind":"ip","value":"1"},"raw":{}}"#,
                "`severity`",
            ),
            (
                r#"{"type":"x","title":"t","severity":"low","entity":{"kind":"cat","value":"1"},"raw":{}}"#,
                "`entity.kind`",
            ),
            (
                r#"{"type":"x","title":"t","severity":"low","entity":{"kind":"ip","value":"1"}}"#,
                "`raw`",
            ),
        ];
        for (body, expected) in cases {
            let err = parse_payload("s", body.as_bytes(), now).unwrap_err();
            assert!(err.contains(expected), "{body}: {err}");
        }
        let ok = parse_payload(
            "s",
            br#"{"source":"gd","type":"Authentication.brute_force","title":"t","severity":4,"entities":[{"kind":"user","value":"bob"}],"raw":{"x":1}}"#,
            now,
        )
        .unwrap();
        assert_eq!(ok.category, "authentication");
        assert_eq!(ok.severity, Severity::High);
        assert_eq!(ok.summary, "[gd]");
        assert_eq!(ok.source_kind, SourceKind::Webhook);
        assert_eq!(ok.raw, Some(serde_json::json!({"x": 1})));
    }
}
