//! Errors of constructing clients. Sending never returns errors into the
//! application: delivery problems are counted and reported (see `client`).

/// What can go wrong building a client, a channel or a layer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API key has characters not allowed in gRPC metadata.
    #[error("the API key contains characters not allowed in metadata")]
    InvalidApiKey,
    /// The endpoint is not an `http://` or `https://` URL.
    #[error("the endpoint `{0}` must be an http:// or https:// URL")]
    InvalidEndpoint(String),
    /// TLS options were given for an `http://` endpoint.
    #[error("TLS options need an https:// endpoint, not `{0}`")]
    TlsNeedsHttps(String),
    /// The TLS options cannot be used (not PEM, key does not match).
    #[error(
        "the TLS options cannot be used (are they PEM, and does the key match the certificate?)"
    )]
    Tls(#[source] tonic::transport::Error),
    /// Connecting failed.
    #[error("failed to connect to {0}")]
    Connect(String, #[source] tonic::transport::Error),
    /// A trusted proxy is not an IP address or CIDR range.
    #[error("`{0}` is not an IP address or CIDR range")]
    InvalidProxy(String),
    /// The client must be built inside a Tokio runtime (it spawns its sender).
    #[error("the client must be built inside a Tokio runtime")]
    NoRuntime,
}

/// Result of constructing things in this crate.
pub type ClientResult<T> = Result<T, ClientError>;
