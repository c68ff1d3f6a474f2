//! Credentials: API key generation, keyed hashing and verification, the
//! operator token, and the authenticated [`Caller`].
//!
//! Keys look like `pk_<16 hex id>_<43 base64url secret>`. Only
//! HMAC-SHA256(key-hashing secret, whole key) is stored; verification recomputes
//! it and compares in constant time. The key-hashing secret ("pepper") comes
//! from configuration or, failing that, is generated once and kept in the store.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::domain::{ApiKey, ApiKeyId, Scope, ScopeSet, TenantId};
use crate::error::{AppError, AppResult};

/// Metadata key clients put their API key in (gRPC and grpc-web alike).
pub const API_KEY_HEADER: &str = "x-api-key";

/// Prefix of every API key and of the operator token.
const KEY_PREFIX: &str = "pk_";

/// The server-side secret that API keys are hashed under.
#[derive(Clone)]
pub struct KeyHasher {
    /// The pepper; never printed.
    pepper: SecretString,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher([REDACTED])")
    }
}

impl KeyHasher {
    /// A hasher keyed with `pepper`.
    pub fn new(pepper: SecretString) -> Self {
        Self { pepper }
    }

    /// HMAC-SHA256 of `secret` under the pepper.
    pub fn hash(&self, secret: &str) -> Vec<u8> {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(self.pepper.expose_secret().as_bytes())
                .expect("HMAC accepts keys of any length");
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Whether `secret` hashes to `expected`, compared in constant time.
    pub fn verify(&self, secret: &str, expected: &[u8]) -> bool {
        self.hash(secret).ct_eq(expected).into()
    }
}

/// A random secret of 32 bytes, base64url without padding.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A freshly generated API key: its id and the full secret shown to the user once.
pub struct GeneratedKey {
    /// Public id, stored in clear.
    pub id: ApiKeyId,
    /// The whole key (`pk_<id>_<secret>`); only its hash is stored.
    pub secret: SecretString,
}

/// Generates a new API key.
pub fn generate_key() -> GeneratedKey {
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    let id = ApiKeyId::parse(&hex::encode(id)).expect("16 lowercase hex characters");
    let secret = format!("{KEY_PREFIX}{id}_{}", random_secret());
    GeneratedKey {
        id,
        secret: SecretString::from(secret),
    }
}

/// Generates an operator token (same shape as a key, id `operator`).
pub fn generate_operator_token() -> SecretString {
    SecretString::from(format!("{KEY_PREFIX}operator_{}", random_secret()))
}

/// Splits a presented key into its id, or `None` if it is not key-shaped.
pub fn parse_key_id(presented: &str) -> Option<ApiKeyId> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if secret.is_empty() {
        return None;
    }
    ApiKeyId::parse(id)
}

/// Who is calling, as established from their credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator token: every scope, no tenant of its own.
    Operator,
    /// A tenant API key.
    Key {
        /// The key's tenant: the tenant of every call made with it.
        tenant_id: TenantId,
        /// The key's id (recorded as "who" in audit trails).
        key_id: ApiKeyId,
        /// What it may do.
        scopes: ScopeSet,
    },
}

impl Caller {
    /// The caller's scopes.
    pub fn scopes(&self) -> ScopeSet {
        match self {
            Caller::Operator => ScopeSet::all(),
            Caller::Key { scopes, .. } => *scopes,
        }
    }

    /// Fails with PERMISSION_DENIED unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> AppResult<()> {
        if self.scopes().contains(scope) {
            Ok(())
        } else {
            Err(AppError::PermissionDenied(format!(
                "this API key lacks the `{}` scope",
                scope.as_str()
            )))
        }
    }

    /// Fails unless the caller is the operator.
    pub fn require_operator(&self) -> AppResult<()> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Key { .. } => Err(AppError::PermissionDenied(
                "only the operator token may do this".into(),
            )),
        }
    }

    /// The tenant of a tenant-scoped call: the key's own tenant. The operator
    /// must name one (`requested`); a key may name only its own.
    pub fn tenant_for(&self, requested: &str, field: &str) -> AppResult<TenantId> {
        match self {
            Caller::Operator => {
                if requested.is_empty() {
                    return Err(AppError::invalid(
                        field,
                        "required when calling with the operator token",
                    ));
                }
                Ok(TenantId::parse(requested, field)?)
            }
            Caller::Key { tenant_id, .. } => {
                if requested.is_empty() || requested == tenant_id.to_string() {
                    Ok(*tenant_id)
                } else {
                    Err(AppError::PermissionDenied(
                        "an API key may only act on its own tenant".into(),
                    ))
                }
            }
        }
    }

    /// The tenant of a data call (events, alerts, incidents). The operator has
    /// none, so data RPCs need a tenant key.
    pub fn data_tenant(&self) -> AppResult<TenantId> {
        match self {
            Caller::Key { tenant_id, .. } => Ok(*tenant_id),
            Caller::Operator => Err(AppError::PermissionDenied(
                "the operator token has no tenant; use a tenant API key".into(),
            )),
        }
    }

    /// Who to record in audit trails: the bare API key id (as CreateApiKey
    /// and WhoAmI return it), or `operator` for the operator token.
    pub fn actor(&self) -> String {
        match self {
            Caller::Operator => "operator".into(),
            Caller::Key { key_id, .. } => key_id.to_string(),
        }
    }
}

/// Checks a presented key against its stored record at `now`.
pub fn check_key(
    hasher: &KeyHasher,
    presented: &str,
    stored: &ApiKey,
    now: DateTime<Utc>,
) -> AppResult<Caller> {
    if !hasher.verify(presented, &stored.secret_hash) {
        return Err(AppError::Unauthenticated("unknown API key"));
    }
    if stored.revoked_at.is_some() {
        return Err(AppError::Unauthenticated("API key revoked"));
    }
    if !stored.is_active(now) {
        return Err(AppError::Unauthenticated("API key expired"));
    }
    Ok(Caller::Key {
        tenant_id: stored.tenant_id,
        key_id: stored.id.clone(),
        scopes: stored.scopes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let hasher = KeyHasher::new(SecretString::from("pepper"));
        let k = generate_key();
        let secret = k.secret.expose_secret();
        assert_eq!(parse_key_id(secret), Some(k.id.clone()));
        let h = hasher.hash(secret);
        assert!(hasher.verify(secret, &h));
        assert!(!hasher.verify(&format!("{secret}x"), &h));
        let other = KeyHasher::new(SecretString::from("other"));
        assert!(!other.verify(secret, &h), "hash must depend on the pepper");
    }

    #[test]
    fn malformed_keys_have_no_id() {
        for bad in [
            "",
            "pk_",
            "pk_zz_abc",
            "pk_0123456789abcdef_",
            "xx_0123456789abcdef_abc",
        ] {
            assert_eq!(parse_key_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hasher_debug_is_redacted() {
        let hasher = KeyHasher::new(SecretString::from("hunter2"));
        assert!(!format!("{hasher:?}").contains("hunter2"));
    }
}

/// Settings key of the generated key-hashing secret.
const PEPPER_SETTING: &str = "key_hashing_secret";
/// Settings key of the generated operator token's hash.
const OPERATOR_SETTING: &str = "operator_token_hash";

/// The key hasher for a store: the configured pepper if any, otherwise the one
/// generated on first start and kept in the store's settings.
///
/// The store keeps a fingerprint of the pepper it was first used with (a keyed
/// hash of a fixed text, so it reveals nothing about the pepper). A different
/// pepper would silently turn every stored key into "unknown API key", so the
/// server refuses to start instead and says why.
pub async fn key_hasher(
    store: &dyn crate::storage::Store,
    configured: Option<&SecretString>,
) -> anyhow::Result<KeyHasher> {
    use anyhow::Context;
    let hasher = match configured {
        Some(p) => KeyHasher::new(p.clone()),
        None => {
            let pepper = store
                .put_setting_if_absent(PEPPER_SETTING, &random_secret())
                .await
                .context("failed to load the key-hashing secret")?;
            KeyHasher::new(SecretString::from(pepper))
        }
    };
    let fingerprint = hex::encode(hasher.hash(PEPPER_FINGERPRINT_TEXT));
    let recorded = store
        .put_setting_if_absent(PEPPER_FINGERPRINT_SETTING, &fingerprint)
        .await
        .context("failed to record the key-hashing secret's fingerprint")?;
    if recorded != fingerprint {
        let what = if configured.is_some() {
            "PICKET_KEY_PEPPER is not the key-hashing secret this store was set up with"
        } else {
            "this store was set up with a PICKET_KEY_PEPPER, and none is set"
        };
        anyhow::bail!(
            "{what}: every API key and the operator token \
             stored here would be refused. Start with the original PICKET_KEY_PEPPER \
             (keep it in a file such as .env), or use a fresh store."
        );
    }
    Ok(hasher)
}

/// What the pepper's fingerprint is a keyed hash of.
const PEPPER_FINGERPRINT_TEXT: &str = "picket key-hashing secret fingerprint v1";

/// Setting that holds the pepper's fingerprint.
const PEPPER_FINGERPRINT_SETTING: &str = "key_hashing_secret_fingerprint";

/// How long a key record read from the store is reused. A key revoked
/// through another replica or `picket admin key revoke` stops working within
/// this (at once through this replica's AdminService, which forgets it).
pub const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most key records kept; beyond it the cache starts over.
const KEY_CACHE_MAX: usize = 10_000;

/// Stored key records by id, each with the time it was read. Only records
/// found in the store are kept (an unknown id is looked up every time), and
/// a cached record is still checked in full on every call: the presented
/// secret against its hash in constant time, its revocation, its expiry.
#[derive(Default)]
struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<ApiKeyId, (ApiKey, std::time::Instant)>>,
}

impl KeyCache {
    fn get(&self, id: &ApiKeyId) -> Option<ApiKey> {
        let entries = self.entries.lock().expect("key cache lock");
        entries
            .get(id)
            .filter(|(_, read)| read.elapsed() < KEY_CACHE_TTL)
            .map(|(k, _)| k.clone())
    }

    fn put(&self, key: ApiKey) {
        let mut entries = self.entries.lock().expect("key cache lock");
        if entries.len() >= KEY_CACHE_MAX {
            entries.clear();
        }
        entries.insert(key.id.clone(), (key, std::time::Instant::now()));
    }

    fn forget(&self, id: &ApiKeyId) {
        self.entries.lock().expect("key cache lock").remove(id);
    }
}

/// Verifies credentials presented on calls.
#[derive(Clone)]
pub struct Authenticator {
    /// Where keys are looked up.
    store: std::sync::Arc<dyn crate::storage::Store>,
    /// Hashes presented secrets.
    hasher: KeyHasher,
    /// Keyed hash of the operator token.
    operator_hash: Vec<u8>,
    /// Key records read in the last [`KEY_CACHE_TTL`], so that hot calls
    /// (CheckAccess: its target is a server-side p99 of 1 ms) do not read
    /// the store each time.
    cache: std::sync::Arc<KeyCache>,
}

impl Authenticator {
    /// Sets up authentication for `store`. The operator token is `configured`
    /// (PICKET_ADMIN_TOKEN) if given; otherwise one is generated on first start
    /// and returned here once (the caller prints it), and only its hash is kept.
    pub async fn bootstrap(
        store: std::sync::Arc<dyn crate::storage::Store>,
        hasher: KeyHasher,
        configured: Option<&SecretString>,
    ) -> anyhow::Result<(Self, Option<SecretString>)> {
        use anyhow::Context;
        let (operator_hash, generated) = match configured {
            Some(token) => (hasher.hash(token.expose_secret()), None),
            None => {
                let token = generate_operator_token();
                let hash = hex::encode(hasher.hash(token.expose_secret()));
                let stored = store
                    .put_setting_if_absent(OPERATOR_SETTING, &hash)
                    .await
                    .context("failed to store the operator token hash")?;
                let fresh = (stored == hash).then_some(token);
                (
                    hex::decode(stored).context("stored operator token hash is not hex")?,
                    fresh,
                )
            }
        };
        Ok((
            Self {
                store,
                hasher,
                operator_hash,
                cache: std::sync::Arc::default(),
            },
            generated,
        ))
    }

    /// The hasher (to create keys with).
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Drops key `id`'s cached record (after revoking it here).
    pub fn forget(&self, id: &ApiKeyId) {
        self.cache.forget(id);
    }

    /// Who presented `credential` (the `x-api-key` value), or UNAUTHENTICATED.
    pub async fn authenticate(&self, credential: Option<&str>) -> AppResult<Caller> {
        let result = self.authenticate_inner(credential).await;
        if let Err(AppError::Unauthenticated(reason)) = &result {
            metrics::counter!("picket_auth_failures_total", "reason" => *reason).increment(1);
        }
        result
    }

    async fn authenticate_inner(&self, credential: Option<&str>) -> AppResult<Caller> {
        let presented = credential.map(str::trim).filter(|c| !c.is_empty()).ok_or(
            AppError::Unauthenticated("missing API key (send it as `x-api-key` metadata)"),
        )?;
        if presented.len() > 512 {
            return Err(AppError::Unauthenticated("unknown API key"));
        }
        match parse_key_id(presented) {
            Some(id) => {
                let stored = match self.cache.get(&id) {
                    Some(k) => k,
                    None => {
                        let k = self
                            .store
                            .find_api_key(&id)
                            .await
                            .map_err(AppError::from)?
                            .ok_or(AppError::Unauthenticated("unknown API key"))?;
                        self.cache.put(k.clone());
                        k
                    }
                };
                check_key(&self.hasher, presented, &stored, Utc::now())
            }
            None if self.hasher.verify(presented, &self.operator_hash) => Ok(Caller::Operator),
            None => Err(AppError::Unauthenticated("unknown API key")),
        }
    }
}
