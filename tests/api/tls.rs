//! TLS end to end: the serving port over rustls (gRPC with a generated
//! client, `/healthz` and `/metrics` over https), mTLS on top of API keys,
//! certificate rotation under an open stream, the plaintext warning, the CLI
//! over `https://`, Postgres with `sslmode=require` / `verify-full`, and
//! Redis over `rediss://`. Certificates come from a throw-away CA (rcgen) in
//! a temporary directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use picket::grpc::pb;
use picket::storage::Backend;
use secrecy::SecretString;
use tokio::io::AsyncBufReadExt;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::common::{
    OPERATOR_TOKEN, RedisProcess, ServerProcess, TestApp, TestDb, redis_state_becomes,
    spawn_connecting, test_settings, with_key,
};
use crate::ingest::login;

/// How long anything awaited here may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// A throw-away CA and the certificates it signs, as PEM files in a
/// temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: CertificateDer<'static>,
}

/// A certificate signed by the test CA and its key.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Self {
            dir,
            issuer: rcgen::Issuer::new(params, key),
            ca: cert.der().clone(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca_path(&self) -> PathBuf {
        self.path("ca.pem")
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_path()).unwrap()
    }

    /// A server certificate for `localhost` and 127.0.0.1 with `serial`.
    fn server(&self, serial: u64) -> Leaf {
        self.leaf(
            serial,
            vec!["localhost".into(), "127.0.0.1".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate named `name`.
    fn client(&self, name: &str) -> Leaf {
        self.leaf(
            7,
            vec![name.into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(&self, serial: u64, names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Writes `leaf` as `<name>.pem` and `<name>.key`; returns both paths.
    /// The key first, each file replaced whole (written aside, renamed), as
    /// a deployment tool would.
    fn write(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        );
        for (path, text) in [(&key, &leaf.key_pem), (&cert, &leaf.cert_pem)] {
            let aside = path.with_extension("tmp");
            std::fs::write(&aside, text).unwrap();
            std::fs::rename(&aside, path).unwrap();
        }
        (cert, key)
    }
}

/// Settings for a test server with TLS from `pki` (server files `server.*`
/// written by the caller), re-reading them every second.
fn tls_settings(db: &TestDb, pki: &Pki, client_ca: bool) -> picket::server::config::Settings {
    let mut s = test_settings(db);
    s.tls_cert = Some(pki.path("server.pem"));
    s.tls_key = Some(pki.path("server.key"));
    s.tls_client_ca = client_ca.then(|| pki.ca_path());
    s.tls_reload_seconds = 1;
    s
}

/// A tonic endpoint to `addr` over TLS, trusting `pki`'s CA, presenting
/// `client` if given.
fn tls_endpoint(addr: SocketAddr, pki: &Pki, client: Option<&Leaf>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .connect_timeout(DEADLINE)
        .tls_config(tls)
        .unwrap()
}

/// Starts the in-process server with TLS; its channel trusts the test CA and
/// presents `client` if given.
async fn spawn_tls(backend: Backend, pki: &Pki, client: Option<&Leaf>) -> TestApp {
    let db = TestDb::new(backend).await;
    let settings = tls_settings(&db, pki, client.is_some());
    spawn_connecting(db, settings, |addr| tls_endpoint(addr, pki, client)).await
}

/// A rustls client configuration trusting `pki`'s CA, with `alpn`.
fn rustls_client(pki: &Pki, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A fresh TLS connection to `addr` (server name `localhost`).
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate the server presents to a new connection.
async fn presented(addr: SocketAddr, pki: &Pki) -> CertificateDer<'static> {
    let tls = tls_connect(addr, rustls_client(pki, &[b"h2"]))
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0]
        .clone()
        .into_owned()
}

/// GET `path` over https (HTTP/1.1); returns (status, body).
async fn https_get(addr: SocketAddr, pki: &Pki, path: &str) -> (u16, String) {
    let (status, body) = https_request(addr, pki, "GET", path, &[], Vec::new()).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1.1 request over https; returns (status, body).
async fn https_request(
    addr: SocketAddr,
    pki: &Pki,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, bytes::Bytes) {
    let tls = tls_connect(addr, rustls_client(pki, &[b"http/1.1"]))
        .await
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "the server agrees on HTTP/1.1"
    );
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn ingest_client(channel: &Channel) -> pb::ingest_service_client::IngestServiceClient<Channel> {
    pb::ingest_service_client::IngestServiceClient::new(channel.clone())
}

async fn ingest(channel: &Channel, key: &str, event: pb::Event) {
    let ack = ingest_client(channel)
        .ingest(with_key(
            pb::IngestRequest {
                events: vec![event],
            },
            key,
        ))
        .await
        .expect("ingest over TLS")
        .into_inner();
    assert_eq!(ack.accepted, 1, "{ack:?}");
}

async fn gauge_like(body: &str, name: &str) -> bool {
    body.lines().any(|l| l.starts_with(name))
}

async fn grpc_and_http_share_the_tls_port(backend: Backend) {
    let pki = Pki::new("Picket test CA");
    pki.write("server", &pki.server(1));
    let app = spawn_tls(backend, &pki, None).await;
    let (tenant, key) = app
        .tenant_with_key("tls", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;

    // (a) A generated client over TLS: a real write and a real read.
    ingest(
        &app.channel,
        &key,
        login("tls-1", "alice", "10.0.0.1", true),
    )
    .await;
    let events = ingest_client(&app.channel)
        .query_events(with_key(pb::QueryEventsRequest::default(), &key))
        .await
        .expect("query over TLS")
        .into_inner()
        .events;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor, "alice");

    // (b) /healthz and /metrics over https on the same port.
    let (status, body) = https_get(app.addr, &pki, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\""), "{body}");
    let (status, body) = https_get(app.addr, &pki, "/metrics").await;
    assert_eq!(status, 200);
    assert!(gauge_like(&body, "picket_up").await, "{body}");

    // grpc-web (HTTP/1.1) on the same port: a unary call with the key.
    let (status, body) = https_request(
        app.addr,
        &pki,
        "POST",
        "/picket.v1.AdminService/WhoAmI",
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
            ("x-api-key", &key),
        ],
        // One empty WhoAmIRequest: flag 0, length 0.
        vec![0u8; 5],
    )
    .await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("grpc-status:0") && text.contains(&tenant),
        "WhoAmI over grpc-web names the tenant: {text}"
    );
    // The webhook route is served there too (an unknown source: 404).
    let (status, _) = https_request(
        app.addr,
        &pki,
        "POST",
        "/v1/webhooks/no-such-source",
        &[("content-type", "application/json")],
        b"{}".to_vec(),
    )
    .await;
    assert!(
        (400..500).contains(&status),
        "webhook route answered {status}"
    );

    // Plain text on the TLS port gets nothing: a plaintext gRPC client fails.
    let plain = async {
        let ch = Channel::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        ingest_client(&ch)
            .query_events(with_key(pb::QueryEventsRequest::default(), &key))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        plain.await.is_err(),
        "plaintext must not be served on a TLS port"
    );

    // A client that does not trust the server's CA refuses it.
    let stranger = Pki::new("Another CA");
    let refused = tls_connect(app.addr, rustls_client(&stranger, &[b"h2"])).await;
    let err = refused.expect_err("a certificate from an unknown CA is refused");
    assert!(
        format!("{err}").to_lowercase().contains("unknown"),
        "the reason names the unknown issuer: {err}"
    );
}

async fn mtls_refuses_clients_without_a_certificate_and_still_needs_a_key(backend: Backend) {
    let pki = Pki::new("Picket test CA");
    pki.write("server", &pki.server(1));
    let client = pki.client("collector-1");
    let app = spawn_tls(backend, &pki, Some(&client)).await;
    // The app's channel presents a CA-signed certificate: it works.
    let (_, key) = app.tenant_with_key("mtls", &[pb::Scope::Read]).await;
    let who = pb::admin_service_client::AdminServiceClient::new(app.channel.clone())
        .who_am_i(with_key(pb::WhoAmIRequest {}, &key))
        .await
        .expect("a CA-signed client certificate and a key are let in")
        .into_inner();
    assert!(!who.tenant_id.is_empty());

    // A certificate is not a key: without one the call is unauthenticated.
    let err = ingest_client(&app.channel)
        .query_events(tonic::Request::new(pb::QueryEventsRequest::default()))
        .await
        .expect_err("mTLS comes on top of API keys");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // No client certificate: refused at the handshake, so even a valid key
    // gets nothing.
    let bare = async {
        let ch = tls_endpoint(app.addr, &pki, None)
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        pb::admin_service_client::AdminServiceClient::new(ch)
            .who_am_i(with_key(pb::WhoAmIRequest {}, &key))
            .await
            .map_err(|e| format!("{e:?}"))
    };
    bare.await.expect_err("no client certificate, no service");
    // The handshake's own answer (TLS 1.3 finishes the client's side first:
    // the server's alert arrives on the first read).
    let answer = match tls_connect(app.addr, rustls_client(&pki, &[b"h2"])).await {
        Err(e) => e.to_string(),
        Ok(mut tls) => {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            format!("{:?}", tls.read_to_end(&mut buf).await)
        }
    };
    assert!(
        answer.contains("CertificateRequired"),
        "the server asks for the missing certificate: {answer}"
    );

    // A client certificate from another CA is refused too.
    let stranger = Pki::new("Another CA");
    let foreign = stranger.client("intruder");
    let other = async {
        let ch = tls_endpoint(app.addr, &pki, Some(&foreign))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        pb::admin_service_client::AdminServiceClient::new(ch)
            .who_am_i(with_key(pb::WhoAmIRequest {}, &key))
            .await
            .map_err(|e| format!("{e:?}"))
    };
    other
        .await
        .expect_err("a certificate the client CA did not sign is refused");
}

async fn a_rotated_certificate_reaches_new_connections_while_a_stream_stays_open(backend: Backend) {
    let pki = Pki::new("Picket test CA");
    let first = pki.server(1);
    pki.write("server", &first);
    let app = spawn_tls(backend, &pki, None).await;
    let (_, key) = app
        .tenant_with_key("rotation", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    assert_eq!(presented(app.addr, &pki).await, first.der);

    // A server-streaming tail on the first certificate's connection.
    let mut tail = ingest_client(&app.channel)
        .tail_events(with_key(
            pb::TailEventsRequest {
                filter: Some(pb::EventFilter {
                    actor: "rotor".into(),
                    ..Default::default()
                }),
                options: Some(pb::WatchOptions {
                    after_cursor: String::new(),
                    heartbeat_interval_seconds: 1,
                }),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    // A heartbeat proves the stream is open before anything is sent.
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(pb::tail_events_response::Item::Heartbeat(_)) =
                tail.message().await.unwrap().unwrap().item
            {
                return;
            }
        }
    })
    .await
    .expect("a heartbeat");
    ingest(
        &app.channel,
        &key,
        login("before", "rotor", "10.0.0.1", true),
    )
    .await;
    assert_eq!(next_event(&mut tail).await, "before");

    // Rotate: a new key and certificate (serial 2) replace the files.
    let second = pki.server(2);
    pki.write("server", &second);
    let started = Instant::now();
    loop {
        if presented(app.addr, &pki).await == second.der {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "new connections never saw the rotated certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "rotation picked up by new handshakes after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // A new generated client on the new certificate works...
    let fresh = tls_endpoint(app.addr, &pki, None).connect().await.unwrap();
    ingest(&fresh, &key, login("after", "rotor", "10.0.0.2", true)).await;
    // ...and the stream opened before the rotation is still delivering.
    assert_eq!(next_event(&mut tail).await, "after");
    // So is a call on the old connection.
    ingest(
        &app.channel,
        &key,
        login("after-old", "rotor", "10.0.0.3", true),
    )
    .await;
    assert_eq!(next_event(&mut tail).await, "after-old");

    // The key replaced before its certificate: the pair does not match, so
    // it is refused and new handshakes keep the second certificate. (The
    // refusal counter is process-wide, shared with tests running beside
    // this one: it only tells that a reload was tried since.)
    let refused = || async {
        let (_, metrics) = https_get(app.addr, &pki, "/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("picket_tls_reloads_total{outcome=\"refused\"} "))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    let before = refused().await;
    let third = pki.server(3);
    std::fs::write(pki.path("server.key"), &third.key_pem).unwrap();
    let started = Instant::now();
    while refused().await <= before {
        assert!(
            started.elapsed() < DEADLINE,
            "the mismatched pair was never looked at"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(presented(app.addr, &pki).await, second.der);
    // Its certificate follows: the pair is whole again and taken.
    std::fs::write(pki.path("server.pem"), &third.cert_pem).unwrap();
    let started = Instant::now();
    while presented(app.addr, &pki).await != third.der {
        assert!(
            started.elapsed() < DEADLINE,
            "the repaired pair was never taken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stream opened under the first certificate outlived both.
    ingest(
        &app.channel,
        &key,
        login("after-third", "rotor", "10.0.0.4", true),
    )
    .await;
    assert_eq!(next_event(&mut tail).await, "after-third");
}

/// The idempotency key of the next event on `tail`, within [`DEADLINE`].
async fn next_event(tail: &mut tonic::Streaming<pb::TailEventsResponse>) -> String {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let item = tail
                .message()
                .await
                .expect("stream healthy")
                .expect("stream open");
            if let Some(pb::tail_events_response::Item::Event(e)) = item.item {
                return e.idempotency_key;
            }
        }
    })
    .await
    .expect("an event within the deadline")
}

/// Runs `picket serve` with `env` until it serves, stops it with
/// SIGTERM and returns every line it logged.
async fn serve_logs(db: &TestDb, env: &[(&str, &str)]) -> Vec<String> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_picket"));
    cmd.args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .env("PICKET_DATABASE_URL", &db.url)
        .env("PICKET_ADMIN_TOKEN", OPERATOR_TOKEN)
        .env("PICKET_KEY_PEPPER", crate::common::KEY_PEPPER)
        .env("PICKET_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn picket");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let serving = line.contains("picket serving");
            seen.push(line);
            if serving {
                return;
            }
        }
        panic!("the server exited before serving: {seen:?}");
    })
    .await
    .expect("the server started");
    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line);
        }
    })
    .await
    .expect("the server stopped on SIGTERM");
    assert!(child.wait().await.unwrap().success(), "{seen:?}");
    seen
}

async fn plaintext_logs_one_warning_that_keys_travel_in_clear(backend: Backend) {
    let db = TestDb::new(backend).await;
    let clear = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("WARN") && l.contains("travel in clear text"))
            .count()
    };
    let logs = serve_logs(&db, &[]).await;
    assert_eq!(clear(&logs), 1, "exactly one warning: {logs:#?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("picket serving") && l.contains("\"tls\":\"off\"")),
        "{logs:#?}"
    );

    let pki = Pki::new("Picket test CA");
    let (cert, key) = pki.write("server", &pki.server(1));
    let logs = serve_logs(
        &db,
        &[
            ("PICKET_TLS_CERT", cert.to_str().unwrap()),
            ("PICKET_TLS_KEY", key.to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(clear(&logs), 0, "no warning with TLS on: {logs:#?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("picket serving") && l.contains("\"tls\":\"on\"")),
        "{logs:#?}"
    );
}

/// Runs the real CLI binary to completion.
async fn cli(args: &[&str], key: &str) -> std::process::Output {
    tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(args)
            .env("PICKET_API_KEY", key)
            .env_remove("PICKET_SERVER")
            .env_remove("PICKET_CA_CERT")
            .env_remove("PICKET_CLIENT_CERT")
            .env_remove("PICKET_CLIENT_KEY")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the CLI finished")
    .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn the_cli_talks_to_an_mtls_server_over_https(backend: Backend) {
    let pki = Pki::new("Picket test CA");
    pki.write("server", &pki.server(1));
    let client = pki.client("cli");
    let (client_cert, client_key) = pki.write("client", &client);
    let app = spawn_tls(backend, &pki, Some(&client)).await;
    let (_, key) = app
        .tenant_with_key("cli-tls", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let server = format!("https://127.0.0.1:{}", app.addr.port());
    let ca = pki.ca_path();
    let (ca, client_cert, client_key) = (
        ca.to_str().unwrap(),
        client_cert.to_str().unwrap(),
        client_key.to_str().unwrap(),
    );
    let tls = [
        "--server",
        server.as_str(),
        "--ca-cert",
        ca,
        "--client-cert",
        client_cert,
        "--client-key",
        client_key,
    ];
    let events = pki.path("events.jsonl");
    let now = chrono::Utc::now();
    std::fs::write(
        &events,
        format!(
            "{{\"occurred_at\":\"{}\",\"event_type\":\"user.login\",\"actor\":\"cli-over-tls\"}}\n",
            now.to_rfc3339()
        ),
    )
    .unwrap();
    let events = events.to_str().unwrap();

    // ingest over https with the CA and a client certificate.
    let mut args = vec!["ingest", events, "--quiet"];
    args.extend(tls);
    let out = cli(&args, &key).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 lines: 1 accepted"),
        "{}",
        text(&out)
    );

    // export reads it back over the same kind of connection.
    let from = (now - chrono::Duration::hours(1)).to_rfc3339();
    let to = (now + chrono::Duration::hours(1)).to_rfc3339();
    let mut args = vec!["export", "events", "--from", &from, "--to", &to];
    args.extend(tls);
    let out = cli(&args, &key).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cli-over-tls"),
        "{}",
        text(&out)
    );

    // tail streams over https: it prints events committed while it runs.
    let mut args = vec!["tail", "--json", "--actor", "tailed"];
    args.extend(tls);
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_picket"))
        .args(&args)
        .env("PICKET_API_KEY", &key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut printed = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    // The tail starts at the newest event when its stream opens: send until
    // one arrives.
    let line = tokio::time::timeout(DEADLINE, async {
        let mut n = 0;
        loop {
            n += 1;
            ingest(
                &app.channel,
                &key,
                login(&format!("tailed-{n}"), "tailed", "", true),
            )
            .await;
            if let Ok(line) =
                tokio::time::timeout(Duration::from_millis(500), printed.next_line()).await
            {
                return line.unwrap().expect("tail exited");
            }
        }
    })
    .await
    .expect("tail printed an event");
    assert!(line.contains("tailed"), "{line}");
    tail.kill().await.unwrap();

    // Without the CA the server's certificate is not trusted.
    let out = cli(
        &[
            "ingest",
            events,
            "--quiet",
            "--server",
            &server,
            "--client-cert",
            client_cert,
            "--client-key",
            client_key,
        ],
        &key,
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UnknownIssuer"),
        "the reason is given: {}",
        text(&out)
    );
    // Without a client certificate the mTLS server refuses.
    let out = cli(
        &[
            "ingest",
            events,
            "--quiet",
            "--server",
            &server,
            "--ca-cert",
            ca,
        ],
        &key,
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    // TLS files with an http:// address are an error, not ignored.
    let plain = format!("http://{}", app.addr);
    let out = cli(
        &[
            "ingest",
            events,
            "--quiet",
            "--server",
            &plain,
            "--ca-cert",
            ca,
        ],
        &key,
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need an https:// server address"),
        "{}",
        text(&out)
    );
}

crate::both_backends!(
    grpc_and_http_share_the_tls_port,
    mtls_refuses_clients_without_a_certificate_and_still_needs_a_key,
    a_rotated_certificate_reaches_new_connections_while_a_stream_stays_open,
    plaintext_logs_one_warning_that_keys_travel_in_clear,
    the_cli_talks_to_an_mtls_server_over_https,
);

/// The database name at the end of a Postgres URL.
fn database_name(url: &str) -> String {
    url.rsplit('/').next().unwrap().to_owned()
}

/// (encrypted, all) connections to database `name`, as `pg_stat_ssl` sees
/// them from the maintenance connection.
async fn backends_of(name: &str) -> (i64, i64) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&crate::common::postgres_admin_url())
        .await
        .unwrap();
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
    )
    .bind(name)
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

/// Starts a server on `db` with `url` as its database URL, checks it serves,
/// and returns its connections to the database as (encrypted, all).
async fn serve_with_url(db: TestDb, url: String) -> (i64, i64) {
    let name = database_name(&db.url);
    let mut settings = test_settings(&db);
    settings.database_url = Some(SecretString::from(url));
    let app = crate::common::spawn_with(db, settings).await;
    let (_, key) = app.tenant_with_key("pg-tls", &[pb::Scope::Read]).await;
    ingest_client(&app.channel)
        .query_events(with_key(pb::QueryEventsRequest::default(), &key))
        .await
        .expect("the server reads its store");
    let started = Instant::now();
    loop {
        let (ssl, all) = backends_of(&name).await;
        if all > 0 {
            return (ssl, all);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the server holds no connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_are_encrypted_with_sslmode_require() {
    use sqlx::Connection;
    // sslmode=require: every connection the server holds is TLS.
    let db = TestDb::new(Backend::Postgres).await;
    let url = format!("{}?sslmode=require", db.url);
    let (ssl, all) = serve_with_url(db, url).await;
    assert_eq!(ssl, all, "{ssl} of {all} connections encrypted");
    eprintln!("sslmode=require: {ssl} of {all} server connections encrypted");

    // The check can tell: sslmode=disable shows plain connections.
    let db = TestDb::new(Backend::Postgres).await;
    let url = format!("{}?sslmode=disable", db.url);
    let (ssl, all) = serve_with_url(db, url).await;
    assert_eq!(ssl, 0, "sslmode=disable: {ssl} of {all} encrypted");

    // verify-full: the server's certificate must chain to sslrootcert and
    // name the host. The local cluster's is self-signed for `localhost`.
    let mut admin = sqlx::PgConnection::connect(&crate::common::postgres_admin_url())
        .await
        .unwrap();
    let cert: String = sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let cert = std::path::Path::new(&cert);
    if std::fs::read(cert).is_err() || !crate::common::postgres_admin_url().contains("127.0.0.1") {
        eprintln!(
            "verify-full not checked: the cluster's certificate {} is not readable here",
            cert.display()
        );
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let localhost = db.url.replacen("127.0.0.1", "localhost", 1);
    let verified = format!(
        "{localhost}?sslmode=verify-full&sslrootcert={}",
        cert.display()
    );
    let (ssl, all) = serve_with_url(db, verified.clone()).await;
    assert_eq!(ssl, all, "verify-full: {ssl} of {all} encrypted");

    // What verification refuses, with `picket migrate` (the same connect
    // path) in a process whose system roots are empty: sqlx adds
    // sslrootcert to the system's roots, and a Debian machine's roots
    // include the cluster's snake-oil certificate (/etc/ssl/certs).
    let db = TestDb::new(Backend::Postgres).await;
    let localhost = db.url.replacen("127.0.0.1", "localhost", 1);
    let stranger = Pki::new("Another CA");
    let empty = stranger.path("no-roots.pem");
    std::fs::write(&empty, "").unwrap();
    let migrate = |url: String| {
        let (empty, dir) = (empty.clone(), stranger.path("."));
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_picket"))
                .args(["--log", "off", "migrate", "--database-url", &url])
                .env("SSL_CERT_FILE", empty)
                .env("SSL_CERT_DIR", dir)
                .output()
                .await
                .unwrap()
        }
    };
    let out = migrate(format!(
        "{localhost}?sslmode=verify-full&sslrootcert={}",
        cert.display()
    ))
    .await;
    assert!(
        out.status.success(),
        "sslrootcert alone is trusted: {}",
        text(&out)
    );
    for (url, why) in [
        (
            format!("{localhost}?sslmode=verify-full"),
            "no root trusts the certificate",
        ),
        (
            format!(
                "{localhost}?sslmode=verify-ca&sslrootcert={}",
                stranger.ca_path().display()
            ),
            "another CA did not sign it",
        ),
        (
            format!(
                "{}?sslmode=verify-full&sslrootcert={}",
                db.url,
                cert.display()
            ),
            "it names localhost, not 127.0.0.1",
        ),
    ] {
        let out = migrate(url).await;
        assert!(
            !out.status.success(),
            "refused because {why}: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("the TLS handshake failed"),
            "the reason is TLS ({why}): {}",
            text(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_changes_through_redis_over_tls() {
    let pki = Pki::new("Picket test CA");
    let (cert, key) = pki.write("redis", &pki.server(1));
    let redis = RedisProcess::start_tls(&cert, &key, &pki.ca_path());
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let db = TestDb::new(Backend::Postgres).await;
    let ca = pki.ca_path();
    // The replicas trust the test CA through SSL_CERT_FILE (rustls reads the
    // system roots from it); polling is slow, so only Redis can wake them.
    let env = [
        ("PICKET_REDIS_URL", url.as_str()),
        ("PICKET_WATCH_POLL_MS", "60000"),
        ("SSL_CERT_FILE", ca.to_str().unwrap()),
    ];
    let a = ServerProcess::start(&db, &env);
    let b = ServerProcess::start(&db, &env);
    redis_state_becomes(a.addr, "up").await;
    redis_state_becomes(b.addr, "up").await;
    let (ca_ch, cb_ch) = (a.channel().await, b.channel().await);
    let tenant = pb::admin_service_client::AdminServiceClient::new(ca_ch.clone())
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "rediss".into(),
                ..Default::default()
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    let key = pb::admin_service_client::AdminServiceClient::new(ca_ch.clone())
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.id,
                name: "t".into(),
                scopes: vec![
                    pb::Scope::Admin as i32,
                    pb::Scope::Ingest as i32,
                    pb::Scope::Read as i32,
                    pb::Scope::Respond as i32,
                ],
                expires_at: None,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    // A watcher on B sees an incident created on A within seconds: the
    // wake-up went through Redis over TLS.
    let mut on_b = crate::replicas::watch(cb_ch, &key).await;
    let id = crate::replicas::create(ca_ch, &key, "over rediss").await;
    let (seen, _, _) = crate::replicas::next_change(&mut on_b).await;
    assert_eq!(seen, id);
}
