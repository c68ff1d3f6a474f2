//! TLS on the serving port (rustls): native gRPC, grpc-web, `/healthz`,
//! `/metrics` and webhooks all go through the same handshake, since they
//! share one listener.
//!
//! **Rotation.** The certificate chain, its key and (for mTLS) the client CA
//! bundle are read from files. A task re-reads them every
//! `--tls-reload-seconds`; when their contents changed and they form a valid
//! configuration, the new one is swapped in (an `Arc` behind a lock), and every
//! handshake from then on uses it. Connections already open keep the
//! session they negotiated, so a long-lived stream survives a rotation. A
//! half-written or mismatched pair is refused with a warning and the old
//! configuration stays in force until the files are right.
//!
//! **Handshakes** run in their own tasks (a slow or silent client cannot
//! hold up the accept loop), with a timeout and a cap on how many run at
//! once; only completed handshakes reach the HTTP/2 and HTTP/1.1 server.
//! With a client CA, a client without a certificate signed by it fails the
//! handshake: mTLS comes on top of API keys, never instead of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; further connections wait to be
/// accepted.
const MAX_HANDSHAKES: usize = 256;
/// Completed connections waiting for the server to take them.
const QUEUE: usize = 64;

/// Where the server's certificate, key and client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of CAs client certificates must chain to (mTLS); none
    /// serves TLS without client certificates.
    pub client_ca: Option<PathBuf>,
}

/// The server's TLS configuration in force, re-read when its files change.
pub struct TlsState {
    files: TlsFiles,
    current: std::sync::RwLock<Arc<rustls::ServerConfig>>,
    /// SHA-256 of the files' contents the current configuration was built
    /// from.
    fingerprint: std::sync::Mutex<[u8; 32]>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The files' contents, read once.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(files: &TlsFiles) -> anyhow::Result<Self> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("failed to read the {what} {}", p.display()))
        };
        Ok(Self {
            cert: read(&files.cert, "TLS certificate")?,
            key: read(&files.key, "TLS key")?,
            client_ca: files
                .client_ca
                .as_ref()
                .map(|p| read(p, "TLS client CA"))
                .transpose()?,
        })
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.cert[..], &self.key[..]] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        if let Some(ca) = &self.client_ca {
            h.update(ca);
        }
        h.finalize().into()
    }

    fn config(&self, files: &TlsFiles) -> anyhow::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not a PEM certificate chain", files.cert.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{}: no certificate in the file",
            files.cert.display()
        );
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .with_context(|| format!("{}: not a PEM private key", files.key.display()))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("no TLS protocol version available")?;
        let builder = match (&self.client_ca, &files.client_ca) {
            (Some(ca), Some(path)) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert =
                        cert.with_context(|| format!("{}: not a PEM CA bundle", path.display()))?;
                    roots
                        .add(cert)
                        .with_context(|| format!("{}: unusable CA certificate", path.display()))?;
                }
                anyhow::ensure!(
                    !roots.is_empty(),
                    "{}: no CA certificate in the file",
                    path.display()
                );
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .context("cannot build the client certificate verifier")?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "{} and {} do not form a usable certificate and key",
                files.cert.display(),
                files.key.display()
            )
        })?;
        // HTTP/2 for gRPC; HTTP/1.1 for grpc-web, /healthz, /metrics and webhooks.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl TlsState {
    /// Reads the files and builds the first configuration; an error names
    /// the file at fault.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let contents = Contents::read(&files)?;
        let config = contents.config(&files)?;
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(Arc::new(config)),
            fingerprint: std::sync::Mutex::new(contents.fingerprint()),
            files,
        }))
    }

    /// Re-reads the files; swaps in a new configuration if they changed and
    /// are valid. Returns whether it swapped.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let contents = Contents::read(&self.files)?;
        let fingerprint = contents.fingerprint();
        if *self.fingerprint.lock().expect("not poisoned") == fingerprint {
            return Ok(false);
        }
        let config = contents.config(&self.files)?;
        *self.current.write().expect("not poisoned") = Arc::new(config);
        *self.fingerprint.lock().expect("not poisoned") = fingerprint;
        Ok(true)
    }

    /// The configuration new handshakes use.
    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().expect("not poisoned").clone()
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-reads the files every `every` until `shutdown`.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // The last failure reported, so a file left broken warns once.
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let state = self.clone();
            let outcome = tokio::task::spawn_blocking(move || state.reload()).await;
            match outcome {
                Ok(Ok(true)) => {
                    failing = None;
                    metrics::counter!("picket_tls_reloads_total", "outcome" => "reloaded")
                        .increment(1);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed; new handshakes use them");
                }
                Ok(Ok(false)) => failing = None,
                Ok(Err(e)) => {
                    let message = format!("{e:#}");
                    if failing.as_deref() != Some(message.as_str()) {
                        metrics::counter!("picket_tls_reloads_total", "outcome" => "refused")
                            .increment(1);
                        tracing::warn!(error = %message, "TLS files changed but cannot be used; the previous certificate stays in force");
                        failing = Some(message);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
            }
        }
    }

    /// Accepts connections on `listener` and completes their handshakes;
    /// the stream yields finished TLS connections until `shutdown`.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => p.expect("semaphore open"),
                    () = shutdown.cancelled() => return,
                };
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off a little.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            metrics::counter!("picket_tls_handshake_failures_total", "reason" => "refused").increment(1);
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("picket_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}
