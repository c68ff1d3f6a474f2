//! Connecting to Picket: the endpoint (`http://` or `https://` with TLS
//! options), the API key sent as `x-api-key` metadata, and which failures
//! a resend can cure. The `picket` CLI connects through this module too.

use std::time::Duration;

use tonic::Request;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{ClientError, ClientResult};

/// The metadata key that carries the API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// A Picket API key (`pk_<id>_<secret>`), checked once to be valid metadata.
/// `Debug` shows only its public id part, never the secret.
#[derive(Clone)]
pub struct ApiKey {
    /// The key as metadata, marked sensitive (never logged by tonic/hyper).
    value: AsciiMetadataValue,
}

impl ApiKey {
    /// Parses `key`; an error if it has characters not allowed in metadata.
    pub fn new(key: &str) -> ClientResult<Self> {
        let mut value = MetadataValue::try_from(key).map_err(|_| ClientError::InvalidApiKey)?;
        value.set_sensitive(true);
        Ok(Self { value })
    }

    /// The key as metadata.
    pub fn metadata(&self) -> &AsciiMetadataValue {
        &self.value
    }

    /// Wraps `msg` in a request carrying this key.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(API_KEY_HEADER, self.value.clone());
        r
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pk_<16 hex id>_<secret>`: the id is not a secret.
        let text = self.value.to_str().unwrap_or_default();
        let id = text
            .strip_prefix("pk_")
            .and_then(|rest| rest.split_once('_'))
            .map(|(id, _)| id)
            .unwrap_or("?");
        write!(f, "ApiKey(pk_{id}_[redacted])")
    }
}

/// Wraps `msg` in a request carrying `key` as `x-api-key`.
pub fn with_key<T>(msg: T, key: &str) -> ClientResult<Request<T>> {
    Ok(ApiKey::new(key)?.request(msg))
}

/// How an `https://` endpoint is verified and, for mTLS, how the client
/// proves who it is. Files are read by the caller: this takes PEM bytes.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificate(s) the server's certificate must chain to,
    /// instead of the system's roots.
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// PEM client certificate and private key, for a server that asks for one.
    pub client_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the server's certificate against, when it differs
    /// from the endpoint's host.
    pub domain_name: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_certificate_pem", &self.ca_certificate_pem.is_some())
            .field("client_identity_pem", &self.client_identity_pem.is_some())
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

impl TlsOptions {
    /// Whether any option is set (they need an `https://` endpoint).
    pub fn is_set(&self) -> bool {
        self.ca_certificate_pem.is_some()
            || self.client_identity_pem.is_some()
            || self.domain_name.is_some()
    }
}

/// An endpoint for `url` (`http://host:port`, or `https://host:port` with
/// `tls`), with TCP_NODELAY and a connect timeout. TLS options with an
/// `http://` address are an error rather than silently unused.
pub fn endpoint(url: &str, tls: &TlsOptions) -> ClientResult<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| ClientError::InvalidEndpoint(url.to_owned()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    match endpoint.uri().scheme_str() {
        Some("https") => {}
        Some("http") if !tls.is_set() => return Ok(endpoint),
        Some("http") => return Err(ClientError::TlsNeedsHttps(url.to_owned())),
        _ => return Err(ClientError::InvalidEndpoint(url.to_owned())),
    }
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_certificate_pem {
        Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
        None => config.with_enabled_roots(),
    };
    if let Some((cert, key)) = &tls.client_identity_pem {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = &tls.domain_name {
        config = config.domain_name(name.clone());
    }
    endpoint.tls_config(config).map_err(ClientError::Tls)
}

/// Connects now (the CLI's way: fail fast if the server is not there).
pub async fn connect(url: &str, tls: &TlsOptions) -> ClientResult<Channel> {
    endpoint(url, tls)?
        .connect()
        .await
        .map_err(|e| ClientError::Connect(url.to_owned(), e))
}

/// A channel that connects on first use and reconnects by itself (the
/// SDK's way: constructing a client never waits for the network).
pub fn connect_lazy(url: &str, tls: &TlsOptions) -> ClientResult<Channel> {
    Ok(endpoint(url, tls)?.connect_lazy())
}

/// What to do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient (the server is down, overloaded or slow): resend the same
    /// thing later, not sooner than the delay the server advised, if any.
    After(Option<Duration>),
    /// The request was over the server's message size limit
    /// (RESOURCE_EXHAUSTED without RetryInfo): resend it in smaller parts.
    Split,
    /// A resend cannot succeed (UNAUTHENTICATED, PERMISSION_DENIED,
    /// INVALID_ARGUMENT, ...).
    Never,
}

/// Classifies a failed call's status.
///
/// UNKNOWN counts as transient: Picket itself answers INTERNAL for its own
/// failures, so an UNKNOWN is the transport's (a connection reset or an
/// HTTP/2 error while the server restarts), and every Picket write is
/// idempotent by key, so a resend is safe.
pub fn classify(status: &tonic::Status) -> Retry {
    use tonic::Code;
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => Retry::After(retry_info(status)),
        Code::ResourceExhausted => match retry_info(status) {
            Some(d) => Retry::After(Some(d)),
            None => Retry::Split,
        },
        _ => Retry::Never,
    }
}

/// Whether a resend of the same request can succeed later.
pub fn is_retryable(status: &tonic::Status) -> bool {
    matches!(classify(status), Retry::After(_))
}

/// The delay the server advised in `google.rpc.RetryInfo`, if any.
pub fn retry_info(status: &tonic::Status) -> Option<Duration> {
    use tonic_types::StatusExt;
    status.get_details_retry_info().and_then(|r| r.retry_delay)
}

/// The server's advised retry delay, or `fallback`.
pub fn retry_delay(status: &tonic::Status, fallback: Duration) -> Duration {
    retry_info(status).unwrap_or(fallback)
}

/// Jittered exponential backoff: attempt `n` (from 0) waits a random time in
/// `[d/2, d]` with `d = min(max, initial * 2^n)`, never less than `floor`
/// (the server's RetryInfo).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first attempt's ceiling.
    pub initial: Duration,
    /// The largest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (0 = the first retry).
    pub fn delay(&self, attempt: u32, floor: Option<Duration>) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << attempt.min(30))
            .min(self.max);
        let jittered = ceiling.mul_f64(rand::random_range(0.5..=1.0));
        jittered.max(floor.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_debug_hides_the_secret() {
        let key = ApiKey::new("pk_0123456789abcdef_supersecret").unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains("0123456789abcdef"), "{shown}");
        assert!(!shown.contains("supersecret"), "{shown}");
        assert!(ApiKey::new("bad\nkey").is_err());
    }

    #[test]
    fn classification_follows_the_contract() {
        use tonic::{Code, Status};
        assert_eq!(classify(&Status::unavailable("down")), Retry::After(None));
        assert_eq!(
            classify(&Status::resource_exhausted("too big")),
            Retry::Split
        );
        let busy = {
            use tonic_types::{ErrorDetails, StatusExt};
            Status::with_error_details(
                Code::ResourceExhausted,
                "busy",
                ErrorDetails::with_retry_info(Some(Duration::from_millis(700))),
            )
        };
        assert_eq!(
            classify(&busy),
            Retry::After(Some(Duration::from_millis(700)))
        );
        assert_eq!(classify(&Status::unauthenticated("no")), Retry::Never);
        assert_eq!(classify(&Status::invalid_argument("no")), Retry::Never);
    }

    #[test]
    fn backoff_is_jittered_capped_and_floored() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
        };
        for _ in 0..100 {
            let d0 = b.delay(0, None);
            assert!(d0 >= Duration::from_millis(500) && d0 <= Duration::from_secs(1));
            let d5 = b.delay(5, None);
            assert!(d5 >= Duration::from_secs(2) && d5 <= Duration::from_secs(4));
            assert!(b.delay(0, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        }
    }

    #[test]
    fn endpoints_need_a_scheme_and_tls_needs_https() {
        assert!(endpoint("http://127.0.0.1:1", &TlsOptions::default()).is_ok());
        assert!(endpoint("127.0.0.1:1", &TlsOptions::default()).is_err());
        let tls = TlsOptions {
            domain_name: Some("x".into()),
            ..Default::default()
        };
        assert!(matches!(
            endpoint("http://127.0.0.1:1", &tls),
            Err(ClientError::TlsNeedsHttps(_))
        ));
    }
}
