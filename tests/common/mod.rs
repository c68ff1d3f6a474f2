//! Test support shared by the test binaries: a fresh database per test on
//! either backend (dropped afterwards), and `spawn_app`, which runs the real
//! server on port 0 and hands back generated clients and a shutdown trigger.
#![allow(dead_code)]

use std::net::SocketAddr;

use picket::grpc::pb;
use picket::server::config::Settings;
use picket::server::startup::Application;
use picket::storage::Backend;
use secrecy::SecretString;
use tokio::sync::oneshot;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// Server-side database for the Postgres tests; override with PICKET_TEST_DATABASE_URL.
pub fn postgres_admin_url() -> String {
    std::env::var("PICKET_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database that exists for one test.
pub struct TestDb {
    /// URL the server connects to.
    pub url: String,
    /// Postgres: (maintenance URL, database name) to drop on drop.
    pg: Option<(String, String)>,
    /// SQLite: the directory holding the file.
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// Waits (at most 30 s) until every transaction the cluster had begun
    /// before this call has ended, so every commit made before it is
    /// readable on the Postgres feeds (they read only below the snapshot's
    /// xmin; another test's open transaction holds it back). SQLite feeds
    /// show every commit at once.
    pub async fn feeds_settled(&self) {
        use sqlx::Connection;
        if self.pg.is_none() {
            return;
        }
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        let mine: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let xmin: i64 =
                sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            if xmin > mine {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "an older transaction stayed open for 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Refreshes the Postgres planner statistics of the whole database as
    /// its owner (tests that read query plans need the row counts of what
    /// they just wrote). Nothing on SQLite: there the store's own
    /// `refresh_statistics` does it, as its maintenance task would.
    pub async fn analyze(&self) {
        use sqlx::Connection;
        if self.pg.is_some() {
            let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
            sqlx::query("ANALYZE").execute(&mut conn).await.unwrap();
        }
    }

    /// A fresh, empty database on `backend`. Panics (failing the test) if
    /// Postgres cannot be reached: no test is skipped silently.
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("picket.db").display());
                Self {
                    url,
                    pg: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                use sqlx::Connection;
                let admin = postgres_admin_url();
                let name = format!("picket_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("Postgres is required for this test ({admin}): {e}")
                    });
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let (base, _) = admin.rsplit_once('/').expect("database URL has a path");
                Self {
                    url: format!("{base}/{name}"),
                    pg: Some((admin, name)),
                    _dir: None,
                }
            }
        }
    }
}

impl TestDb {
    /// An empty stand-in, for moving a database out of a stopped app.
    pub fn placeholder() -> Self {
        Self {
            url: String::new(),
            pg: None,
            _dir: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs outside async context: use a private runtime on a thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut conn)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

/// The operator token every test server uses.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";
/// The key-hashing secret every test server uses.
pub const KEY_PEPPER: &str = "test-key-pepper";

/// Settings for a test server on port 0 over `db`.
pub fn test_settings(db: &TestDb) -> Settings {
    let mut s = Settings::with_database(Some(&db.url));
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.admin_token = Some(SecretString::from(OPERATOR_TOKEN.to_owned()));
    s.key_pepper = Some(SecretString::from(KEY_PEPPER.to_owned()));
    s.shutdown_grace_seconds = 5;
    // Every firing reaches the alert store, so folding is what tests observe.
    s.detect_refire_seconds = 0;
    s
}

/// A running server.
pub struct TestApp {
    /// Its address.
    pub addr: SocketAddr,
    /// A channel to it.
    pub channel: Channel,
    /// The store it uses (for direct setup in tests).
    pub store: std::sync::Arc<dyn picket::storage::Store>,
    /// Fires the shutdown.
    shutdown: Option<oneshot::Sender<()>>,
    /// The server task.
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Keeps the database alive as long as the app.
    pub db: TestDb,
}

/// Starts the real server on port 0 over a fresh database on `backend`.
pub async fn spawn_app(backend: Backend) -> TestApp {
    let db = TestDb::new(backend).await;
    let settings = test_settings(&db);
    spawn_with(db, settings).await
}

/// Starts the real server with explicit settings.
pub async fn spawn_with(db: TestDb, settings: Settings) -> TestApp {
    spawn_connecting(db, settings, |addr| {
        Channel::from_shared(format!("http://{addr}")).unwrap()
    })
    .await
}

/// Starts the real server with explicit settings; the app's channel
/// connects through `endpoint(addr)` (TLS, a client certificate, …).
pub async fn spawn_connecting(
    db: TestDb,
    settings: Settings,
    endpoint: impl FnOnce(SocketAddr) -> tonic::transport::Endpoint,
) -> TestApp {
    // Logs on demand: PICKET_TEST_LOG=info cargo test …
    if let Ok(filter) = std::env::var("PICKET_TEST_LOG") {
        picket::server::telemetry::init_tracing(
            picket::server::telemetry::LogFormat::Human,
            &filter,
        );
    }
    let app = Application::build(settings).await.expect("build app");
    let addr = app.local_addr();
    let store = app.store();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    // The listener is already bound, so connecting cannot race the server.
    let channel = endpoint(addr).connect().await.expect("connect");
    TestApp {
        addr,
        channel,
        store,
        shutdown: Some(tx),
        server: Some(server),
        db,
    }
}

impl TestApp {
    /// Triggers shutdown and waits for the server to stop; returns its result.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.server.take() {
            Some(h) => h.await.expect("server task panicked"),
            None => Ok(()),
        }
    }

    /// Triggers shutdown without waiting.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server task to finish.
    pub async fn join(&mut self) -> anyhow::Result<()> {
        match self.server.take() {
            Some(h) => h.await.expect("server task panicked"),
            None => Ok(()),
        }
    }

    /// Waits (at most 30 s) until the server's detection leads its shards
    /// (`/healthz` `detect_shards` > 0). Events sent before that are not
    /// evaluated live: the take-over replays only the last `replay` hours
    /// of event time, so a test sending back-dated events, or measuring the
    /// live path, waits for this first.
    pub async fn wait_detecting(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (_, _, body) = http1(self.addr, "GET", "/healthz", &[], vec![]).await;
            let health: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if health["detect_shards"].as_u64().is_some_and(|n| n > 0) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "detection never took its shards on: {health}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server's report rollups hold every readable event of
    /// every tenant (reports then read them instead of the raw events).
    pub async fn wait_rolled_up(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let tenants = self.store.list_tenants(None, 1000).await.expect("tenants");
            let mut behind = Vec::new();
            for t in &tenants {
                let head = self.store.events_head(t.id).await.expect("head");
                let rolled = self.store.rollup_position(t.id).await.expect("position");
                if head.is_some() && rolled < head {
                    behind.push(t.name.clone());
                }
            }
            if behind.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the rollups never caught up for {behind:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// An AdminService client.
    pub fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Channel> {
        pb::admin_service_client::AdminServiceClient::new(self.channel.clone())
    }

    /// An IngestService client.
    pub fn ingest(&self) -> pb::ingest_service_client::IngestServiceClient<Channel> {
        pb::ingest_service_client::IngestServiceClient::new(self.channel.clone())
    }

    /// Creates a tenant (as the operator) and a key with `scopes` for it;
    /// returns (tenant id, key secret).
    pub async fn tenant_with_key(&self, name: &str, scopes: &[pb::Scope]) -> (String, String) {
        tenant_with_key(&self.channel, name, scopes).await
    }

    /// The id of the API key `key`, as WhoAmI answers it.
    pub async fn key_id(&self, key: &str) -> String {
        self.admin()
            .who_am_i(with_key(pb::WhoAmIRequest::default(), key))
            .await
            .expect("who am i")
            .into_inner()
            .key_id
    }

    /// Creates a key for the tenant called `name` (as the operator).
    pub async fn key_for_tenant_named(&self, name: &str, scopes: &[pb::Scope]) -> String {
        let id = self
            .store
            .find_tenant_by_name(name)
            .await
            .unwrap()
            .expect("tenant")
            .id
            .to_string();
        self.key_for(&id, scopes).await
    }

    /// Creates a key for an existing tenant (as the operator).
    pub async fn key_for(&self, tenant_id: &str, scopes: &[pb::Scope]) -> String {
        key_for(&self.channel, tenant_id, scopes).await
    }
}

/// Creates a tenant called `name` on the server behind `channel` (as the
/// operator) and a key with `scopes` for it; returns (tenant id, key secret).
pub async fn tenant_with_key(
    channel: &Channel,
    name: &str,
    scopes: &[pb::Scope],
) -> (String, String) {
    let tenant = pb::admin_service_client::AdminServiceClient::new(channel.clone())
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: name.into(),
                ..Default::default()
            },
            OPERATOR_TOKEN,
        ))
        .await
        .expect("create tenant")
        .into_inner()
        .tenant
        .unwrap();
    let key = key_for(channel, &tenant.id, scopes).await;
    (tenant.id, key)
}

/// Creates a key with `scopes` for an existing tenant (as the operator).
pub async fn key_for(channel: &Channel, tenant_id: &str, scopes: &[pb::Scope]) -> String {
    pb::admin_service_client::AdminServiceClient::new(channel.clone())
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant_id.into(),
                name: "test".into(),
                scopes: scopes.iter().map(|s| *s as i32).collect(),
                expires_at: None,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .expect("create key")
        .into_inner()
        .secret
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.trigger_shutdown();
    }
}

/// Wraps `msg` in a request carrying `key` as `x-api-key`.
pub fn with_key<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "x-api-key",
        MetadataValue::try_from(key).expect("ascii key"),
    );
    r
}

/// Generates one `#[tokio::test]` per backend for each listed async fn taking a `Backend`.
#[macro_export]
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(picket::storage::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(picket::storage::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// A plain HTTP/1.1 request; returns (status, headers, body).
pub async fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(bytes::Bytes::from(body))).unwrap())
        .await
        .expect("http request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// Waits until `/healthz` on `addr` reports Redis as `want`.
pub async fn redis_state_becomes(addr: SocketAddr, want: &str) {
    let started = std::time::Instant::now();
    loop {
        let (_, _, body) = http1(addr, "GET", "/healthz", &[], vec![]).await;
        let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if health["redis"] == want {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{addr}: redis never became {want}: {health}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A `picket serve` child process (the real binary), killed when dropped.
pub struct ServerProcess {
    /// The process.
    pub child: std::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary on port 0 over `db` with extra environment `env`,
    /// and waits for its "serving" log line (which carries the bound address).
    pub fn start(db: &TestDb, env: &[(&str, &str)]) -> Self {
        Self::start_on(db, "127.0.0.1:0", env)
    }

    /// [`Self::start`] on a given address (to restart on the same port).
    pub fn start_on(db: &TestDb, listen: &str, env: &[(&str, &str)]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_picket"));
        cmd.args(["--log-format", "json", "serve", "--listen", listen])
            .env("PICKET_DATABASE_URL", &db.url)
            .env("PICKET_ADMIN_TOKEN", OPERATOR_TOKEN)
            .env("PICKET_KEY_PEPPER", KEY_PEPPER)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn picket");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines.next().expect("server exited before serving").unwrap();
            if line.contains("picket serving") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                break v["addr"].as_str().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe;
        // PICKET_TEST_LOG shows it.
        let show = std::env::var_os("PICKET_TEST_LOG").is_some();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if show {
                    eprintln!("[picket {addr}] {line}");
                }
            }
        });
        Self { child, addr }
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private `redis-server` child process on its own port (so a test can
/// stop and start it without touching the machine's Redis), killed when dropped.
pub struct RedisProcess {
    child: Option<std::process::Child>,
    /// Its port.
    pub port: u16,
    /// TLS only (certificate, key, CA), on `port`, if set.
    tls: Option<[std::path::PathBuf; 3]>,
}

impl RedisProcess {
    /// Starts redis-server on a free port and waits until it accepts
    /// connections. Panics (failing the test) if redis-server is missing.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Self {
            child: None,
            port,
            tls: None,
        };
        r.restart();
        r
    }

    /// Starts redis-server serving TLS only (no plaintext port) with
    /// `cert` and `key`, without asking clients for certificates; `ca` is
    /// its CA bundle (redis-server needs one). Panics if redis-server was
    /// built without TLS.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Self {
            child: None,
            port,
            tls: Some([cert.into(), key.into(), ca.into()]),
        };
        r.restart();
        r
    }

    /// The URL clients use: `rediss://localhost:…` when it serves TLS.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Stops it (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same port, waiting for "Ready to accept connections".
    pub fn restart(&mut self) {
        use std::io::{BufRead, BufReader};
        self.stop();
        let port = self.port.to_string();
        let ports = match &self.tls {
            None => vec!["--port", port.as_str()],
            Some([cert, key, ca]) => vec![
                "--port",
                "0",
                "--tls-port",
                port.as_str(),
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--tls-ca-cert-file",
                ca.to_str().unwrap(),
                "--tls-auth-clients",
                "no",
            ],
        };
        let mut child = std::process::Command::new("redis-server")
            .args(ports)
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server is required for this test (apt-get install redis-server): {e}")
            });
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = lines
                .next()
                .expect("redis-server exited before it was ready")
                .unwrap();
            if line.contains("Ready to accept connections") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends hand-encoded bytes as the request message; decodes responses as `D`.
pub struct RawCodec<D>(std::marker::PhantomData<D>);

impl<D> Default for RawCodec<D> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<D: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<D> {
    type Encode = Vec<u8>;
    type Decode = D;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<D>;
    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

pub struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}
