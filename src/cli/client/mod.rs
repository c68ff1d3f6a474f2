//! The command line's gRPC client side: `picket ingest`, `picket tail`,
//! `picket decisions`, `picket export`, `picket playbook apply`, the
//! `picket bench` load generators and the `picket simulate` scenario
//! simulator. Talks to a server through the generated clients exactly like
//! any other client would.

pub mod bench;
pub mod bench_detect;
pub mod bench_enforce;
pub mod bench_fanout;
pub mod bench_reports;
pub mod bench_respond;
pub mod bench_shards;
pub mod bench_soak;
pub mod bench_storm;
pub mod decisions;
pub mod export;
pub mod ingest;
pub mod json;
pub mod playbook;
pub mod report;
mod serve_child;
pub mod simulate;
pub mod tail;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Server address: `http://host:port`, or `https://host:port` for a
    /// server with TLS (verified against the system's roots, or `--ca-cert`).
    #[arg(long, env = "PICKET_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// API key (`pk_…`).
    #[arg(long, env = "PICKET_API_KEY", hide_env_values = true, value_parser = secret)]
    pub api_key: SecretString,
    /// TLS to the server.
    #[command(flatten)]
    pub tls: ClientTls,
}

/// How the CLI verifies an `https://` server and, for mTLS, proves who it is.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTls {
    /// PEM CA certificate(s) the server's certificate must chain to, instead
    /// of the system's roots (a private CA or a self-signed certificate).
    /// Needs an `https://` server address.
    #[arg(long, env = "PICKET_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (its
    /// `--tls-client-ca`). Needs `--client-key` and an `https://` address.
    #[arg(long, env = "PICKET_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `--client-cert`.
    #[arg(long, env = "PICKET_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// Largest certificate or key file the CLI reads.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

impl ClientTls {
    /// An endpoint for `url`: plain for `http://`, TLS for `https://` with
    /// these files. TLS files with an `http://` address are an error rather
    /// than silently unused.
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid server address `{url}`"))?;
        let files = self.ca_cert.is_some() || self.client_cert.is_some();
        match endpoint.uri().scheme_str() {
            Some("https") => {}
            Some("http") => {
                anyhow::ensure!(
                    !files,
                    "--ca-cert, --client-cert and --client-key need an https:// server address, not `{url}`"
                );
                return Ok(endpoint);
            }
            _ => anyhow::bail!("the server address `{url}` must start with http:// or https://"),
        }
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_cert {
            Some(path) => {
                config.ca_certificate(Certificate::from_pem(read_pem(path, "CA certificate")?))
            }
            None => config.with_enabled_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            config = config.identity(Identity::from_pem(
                read_pem(cert, "client certificate")?,
                read_pem(key, "client key")?,
            ));
        }
        endpoint.tls_config(config).context(
            "the TLS files cannot be used (are they PEM, and does the key match the certificate?)",
        )
    }
}

/// Reads a PEM file of at most [`MAX_PEM_BYTES`].
fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("failed to open the {what} {}", path.display()))?;
    let mut pem = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut pem)
        .with_context(|| format!("failed to read the {what} {}", path.display()))?;
    anyhow::ensure!(
        pem.len() as u64 <= MAX_PEM_BYTES,
        "the {what} {} is larger than {} KiB",
        path.display(),
        MAX_PEM_BYTES / 1024
    );
    Ok(pem)
}

fn secret(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s.to_owned()))
}

impl ServerArgs {
    /// Connects to the server.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        self.tls
            .endpoint(&self.server)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("failed to connect to {}", self.server))
    }

    /// Wraps `msg` with the API key.
    pub fn request<T>(&self, msg: T) -> anyhow::Result<Request<T>> {
        with_key(msg, self.api_key.expose_secret())
    }
}

/// Wraps `msg` in a request carrying `key` as `x-api-key`.
pub fn with_key<T>(msg: T, key: &str) -> anyhow::Result<Request<T>> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        crate::access::auth::API_KEY_HEADER,
        MetadataValue::try_from(key)
            .context("the API key contains characters not allowed in metadata")?,
    );
    Ok(r)
}

/// Whether a status means "resend later" rather than "this input is wrong".
pub fn is_retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Cancelled
    )
}

/// The server's advised retry delay, or `fallback`.
pub fn retry_delay(status: &tonic::Status, fallback: Duration) -> Duration {
    use tonic_types::StatusExt;
    status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .unwrap_or(fallback)
}

/// Creates tenant `name` and an API key named `key_name` with `scopes` for it,
/// as the operator; returns the tenant id and the key's secret. The bench and
/// simulation commands set themselves up this way.
pub async fn tenant_with_key(
    admin: &mut crate::grpc::pb::admin_service_client::AdminServiceClient<Channel>,
    operator: &str,
    name: String,
    key_name: &str,
    scopes: &[crate::grpc::pb::Scope],
) -> anyhow::Result<(String, String)> {
    use crate::grpc::pb;
    let tenant = admin
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name,
                ..Default::default()
            },
            operator,
        )?)
        .await?
        .into_inner()
        .tenant
        .context("no tenant")?;
    let secret = admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.id.clone(),
                name: key_name.into(),
                scopes: scopes.iter().map(|s| *s as i32).collect(),
                expires_at: None,
            },
            operator,
        )?)
        .await?
        .into_inner()
        .secret;
    Ok((tenant.id, secret))
}
