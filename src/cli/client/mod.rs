//! The command line's gRPC client side: `picket ingest`, `picket tail`,
//! `picket decisions`, `picket export`, `picket playbook apply`, the
//! `picket bench` load generators (`bench sdk` measures the Rust SDK) and the `picket simulate` scenario
//! simulator. Talks to a server through the generated clients exactly like
//! any other client would.

pub mod bench;
pub mod bench_detect;
pub mod bench_enforce;
pub mod bench_fanout;
pub mod bench_reports;
pub mod bench_respond;
pub mod bench_sdk;
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

use anyhow::Context;
use picket_client::transport::{self, TlsOptions};
pub use picket_client::transport::{Backoff, retry_delay, retry_info};
use secrecy::{ExposeSecret, SecretString};
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

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
    /// these files (built by the Rust SDK's `transport::endpoint`, which the
    /// SDK's own clients use too). TLS files with an `http://` address are
    /// an error rather than silently unused.
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let files = self.ca_cert.is_some() || self.client_cert.is_some();
        anyhow::ensure!(
            !(files && url.starts_with("http://")),
            "--ca-cert, --client-cert and --client-key need an https:// server address, not `{url}`"
        );
        anyhow::ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "the server address `{url}` must start with http:// or https://"
        );
        let mut tls = TlsOptions::default();
        if let Some(path) = &self.ca_cert {
            tls.ca_certificate_pem = Some(read_pem(path, "CA certificate")?);
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls.client_identity_pem = Some((
                read_pem(cert, "client certificate")?,
                read_pem(key, "client key")?,
            ));
        }
        Ok(transport::endpoint(url, &tls)?)
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
    Ok(transport::with_key(msg, key)?)
}

/// Whether a status means "resend later" rather than "this input is
/// wrong": the Rust SDK's classification, except UNKNOWN. The SDK resends
/// on UNKNOWN (a transport failure mid-call); a person at the command line
/// gets the error at once instead (a TLS refusal surfaces as UNKNOWN).
pub fn is_retryable(status: &tonic::Status) -> bool {
    status.code() != tonic::Code::Unknown && picket_client::transport::is_retryable(status)
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
