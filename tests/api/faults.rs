//! Faults at the database, on the real binary: a Postgres server that cannot
//! be reached when `picket serve` starts is retried with backoff for
//! `--database-wait-seconds`, then named (host and port) in the exit error;
//! one that becomes reachable within that time is used without a restart;
//! one that goes away while serving makes health NOT_SERVING, and the same
//! process serves again once it is back.

use std::time::{Duration, Instant};

use picket::grpc::pb;
use picket::storage::Backend;

use crate::common::{self, OPERATOR_TOKEN, ServerProcess, TestDb, with_key};

/// A local TCP port nothing listens on (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs `picket serve` on `url` with `--database-wait-seconds wait` until it
/// exits (it is expected to: its database is out of reach).
async fn serve_until_exit(url: String, wait: &'static str) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .env("PICKET_DATABASE_URL", &url)
            .env("PICKET_DATABASE_WAIT_SECONDS", wait)
            .env("PICKET_ADMIN_TOKEN", OPERATOR_TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn an_unreachable_postgres_is_retried_then_named_in_the_exit_error() {
    let port = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/picket");
    let started = Instant::now();
    let out = serve_until_exit(url, "2").await;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started without a database");
    assert!(
        stderr.contains(&format!("on 127.0.0.1:{port}")) && stderr.contains("could not be reached"),
        "{stderr}"
    );
    let retries = stderr
        .lines()
        .filter(|l| l.contains("cannot be reached yet; retrying"))
        .count();
    // 0.5 s, then 1 s: two pauses fit in 2 s, a third (2 s) does not.
    assert_eq!(retries, 2, "{stderr}");
    assert!(stderr.contains("tried 3 times"), "{stderr}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(20),
        "{took:?}"
    );
    // Waiting cannot fix a refused login: no retry, at once.
    let db = TestDb::new(Backend::Postgres).await;
    let wrong_user = db.url.replace("postgres@", "no_such_role@");
    let out = serve_until_exit(wrong_user, "30").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert!(stderr.contains("refused the user"), "{stderr}");
}

#[tokio::test]
async fn serve_waits_for_postgres_to_become_reachable() {
    let db = TestDb::new(Backend::Postgres).await;
    // The server is pointed at a port where, after an outage, a proxy to the
    // real Postgres starts listening.
    let (mut proxy, through_proxy) = Proxy::to_db(&db);
    let started = Instant::now();
    let server = tokio::task::spawn_blocking(move || {
        let server = ServerProcess::start(
            &db,
            &[
                ("PICKET_DATABASE_URL", through_proxy.as_str()),
                ("PICKET_DATABASE_WAIT_SECONDS", "60"),
            ],
        );
        (server, db)
    });
    // The outage: two seconds with nothing listening.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!server.is_finished(), "serve did not wait for the database");
    proxy.open();
    let (server, _db) = tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("serve did not start once the database was reachable")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(2));
    // It serves: a tenant is created and read back through the proxy.
    let mut admin = pb::admin_service_client::AdminServiceClient::new(server.channel().await);
    let req = with_key(
        pb::CreateTenantRequest {
            name: "after-the-outage".into(),
            ..Default::default()
        },
        OPERATOR_TOKEN,
    );
    let tenant = admin
        .create_tenant(req)
        .await
        .expect("CreateTenant")
        .into_inner();
    assert!(tenant.tenant.is_some());
}

/// A TCP proxy on a fixed local port to the real Postgres, which the test
/// can cut (nothing accepted, every connection closed) and restore.
struct Proxy {
    port: u16,
    target: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy (not yet open) to `db`'s Postgres server, and `db`'s URL
    /// through it.
    fn to_db(db: &TestDb) -> (Self, String) {
        let (user, rest) = db.url.split_once('@').expect("a user in the test URL");
        let (host_port, name) = rest.split_once('/').expect("a database in the test URL");
        let target = if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:5432")
        };
        let port = free_port();
        let proxy = Self {
            port,
            target,
            task: None,
        };
        (proxy, format!("{user}@127.0.0.1:{port}/{name}"))
    }

    fn open(&mut self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], self.port)))
            .unwrap();
        let listener = socket.listen(64).unwrap();
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            // Aborting the task drops the set, which aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// grpc health's answer for the whole server.
async fn health(channel: tonic::transport::Channel) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health check")
        .into_inner()
        .status
}

/// Polls grpc health until it answers `want` (at most `within`).
async fn health_becomes(
    channel: &tonic::transport::Channel,
    want: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let now = health(channel.clone()).await;
        if now == want as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health stayed {now}, never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn health_follows_the_store_and_the_server_recovers_without_a_restart() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let db = TestDb::new(Backend::Postgres).await;
    let (mut proxy, url) = Proxy::to_db(&db);
    proxy.open();
    let (server, _db) = tokio::task::spawn_blocking(move || {
        let server = ServerProcess::start(&db, &[("PICKET_DATABASE_URL", url.as_str())]);
        (server, db)
    })
    .await
    .unwrap();
    let channel = server.channel().await;
    assert_eq!(health(channel.clone()).await, ServingStatus::Serving as i32);

    // The database goes away: every connection cut, none accepted.
    proxy.cut();
    health_becomes(&channel, ServingStatus::NotServing, Duration::from_secs(20)).await;
    let (status, _, body) = common::http1(server.addr, "GET", "/healthz", &[], vec![]).await;
    assert_eq!(status, 503, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("store_unavailable"));

    // It comes back: the same process serves again.
    proxy.open();
    health_becomes(&channel, ServingStatus::Serving, Duration::from_secs(30)).await;
    let (status, _, _) = common::http1(server.addr, "GET", "/healthz", &[], vec![]).await;
    assert_eq!(status, 200);
    let tenant = pb::admin_service_client::AdminServiceClient::new(channel.clone())
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "after-recovery".into(),
                ..Default::default()
            },
            OPERATOR_TOKEN,
        ))
        .await
        .expect("CreateTenant after the store came back")
        .into_inner();
    assert!(tenant.tenant.is_some());
}
