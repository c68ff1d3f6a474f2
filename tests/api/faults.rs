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

/// The database name and a maintenance URL (database `postgres`) of `url`.
fn db_name_and_admin_url(url: &str) -> (String, String) {
    let (base, name) = url.rsplit_once('/').expect("a database in the URL");
    let name = name.split('?').next().unwrap_or(name).to_owned();
    (name, format!("{base}/postgres"))
}

/// Ends every connection to database `name`: the server's pool, its
/// detection and watch connections alike.
async fn terminate_backends(admin_url: &str, name: &str) -> u64 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    ended.into_iter().filter(|e| *e).count() as u64
}

/// Sends `events` with unary Ingest until every one has a receipt (ACCEPTED
/// or DUPLICATE), resending the same events (same idempotency keys) after
/// every failure, which must be a retryable UNAVAILABLE carrying RetryInfo;
/// returns how many failures were seen.
async fn send_until_acked(
    channel: tonic::transport::Channel,
    key: String,
    events: Vec<pb::Event>,
) -> u32 {
    use tonic_types::StatusExt;
    let mut client = pb::ingest_service_client::IngestServiceClient::new(channel);
    let mut failures = 0;
    loop {
        let req = with_key(
            pb::IngestRequest {
                events: events.clone(),
            },
            &key,
        );
        match client.ingest(req).await {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(r.rejected, 0, "{:?}", r.receipts);
                assert_eq!(r.accepted + r.duplicates, events.len() as u32);
                return failures;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                let retry = s
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or_else(|| panic!("UNAVAILABLE without RetryInfo: {s:?}"));
                failures += 1;
                assert!(failures < 200, "never acknowledged: {s:?}");
                tokio::time::sleep(retry.min(Duration::from_secs(1))).await;
            }
        }
    }
}

/// Failed logins from `ip`, keys tagged `tag`.
fn burst(tag: &str, ip: &str, n: usize) -> Vec<pb::Event> {
    (0..n)
        .map(|i| crate::ingest::login(&format!("{tag}-{i}"), "mallory", ip, false))
        .collect()
}

/// The next alert naming `ip` on `stream`, resubscribing after the last
/// durable cursor whenever the stream ends or fails.
async fn alert_naming(
    alerts: &mut pb::alert_service_client::AlertServiceClient<tonic::transport::Channel>,
    key: &str,
    stream: &mut tonic::Streaming<pb::WatchAlertsResponse>,
    cursor: &mut String,
    ip: &str,
) -> pb::Alert {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no alert naming {ip}");
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(item))) => {
                if !item.cursor.is_empty() {
                    *cursor = item.cursor.clone();
                }
                if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item
                    && a.entities.iter().any(|e| e.value == ip)
                {
                    return a;
                }
            }
            Ok(_) => {
                // Ended or failed: resume after the last durable cursor.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(s) = alerts
                    .watch_alerts(with_key(watch_request(cursor), key))
                    .await
                {
                    *stream = s.into_inner();
                }
            }
            Err(_) => {} // heartbeats stopped for 5 s: poll again
        }
    }
}

fn watch_request(after: &str) -> pb::WatchAlertsRequest {
    pb::WatchAlertsRequest {
        filter: None,
        options: Some(pb::WatchOptions {
            after_cursor: after.into(),
            heartbeat_interval_seconds: 1,
        }),
    }
}

/// Every connection to the database ends, again and again, while four
/// clients ingest: callers see only retryable UNAVAILABLE with RetryInfo,
/// every event they were told was stored is stored exactly once, the same
/// process recovers by itself, and detection and a watch stream carry on
/// from where they were (a burst after the faults is alerted and delivered).
#[tokio::test]
async fn connections_ended_during_ingest_lose_and_duplicate_nothing() {
    let db = TestDb::new(Backend::Postgres).await;
    let (name, admin_url) = db_name_and_admin_url(&db.url);
    let (server, db) = tokio::task::spawn_blocking(move || (ServerProcess::start(&db, &[]), db))
        .await
        .unwrap();
    let channel = server.channel().await;
    let (tenant_id, key) =
        common::tenant_with_key(&channel, "acme", &[pb::Scope::Ingest, pb::Scope::Read]).await;
    // Detection leads its shards before the first burst.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, body) = common::http1(server.addr, "GET", "/healthz", &[], vec![]).await;
        let h: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if h["detect_shards"].as_u64().is_some_and(|n| n > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "detection never led: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut alerts = pb::alert_service_client::AlertServiceClient::new(channel.clone());
    let mut stream = alerts
        .watch_alerts(with_key(watch_request(""), &key))
        .await
        .unwrap()
        .into_inner();
    let mut cursor = String::new();
    send_until_acked(
        channel.clone(),
        key.clone(),
        burst("before", "203.0.113.7", 8),
    )
    .await;
    alert_naming(&mut alerts, &key, &mut stream, &mut cursor, "203.0.113.7").await;
    assert!(!cursor.is_empty());

    // Four clients, 25 batches of 40 events each, while every connection
    // to the database is ended five times.
    let (clients, batches, size) = (4, 25, 40);
    let mut senders = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (channel, key) = (channel.clone(), key.clone());
        senders.spawn(async move {
            let mut failures = 0;
            for b in 0..batches {
                let events = (0..size)
                    .map(|i| {
                        crate::ingest::login(&format!("c{c}-b{b}-{i}"), "ok", "198.51.100.20", true)
                    })
                    .collect();
                failures += send_until_acked(channel.clone(), key.clone(), events).await;
            }
            failures
        });
    }
    let mut ended = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ended += terminate_backends(&admin_url, &name).await;
    }
    let mut failures = 0;
    while let Some(f) = senders.join_next().await {
        failures += f.unwrap();
    }
    assert!(ended > 0, "no connection was ended");

    // Every acknowledged event stored exactly once.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let (rows, keys): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT idem) FROM events WHERE tenant_id = $1::uuid AND actor = 'ok'",
    )
    .bind(&tenant_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, keys), (i64::from(clients * batches * size), rows));
    pool.close().await;

    // Detection and the watch carry on: a burst after the faults is alerted
    // and delivered (on the same stream or one resumed after its cursor).
    send_until_acked(
        channel.clone(),
        key.clone(),
        burst("after", "203.0.113.8", 8),
    )
    .await;
    alert_naming(&mut alerts, &key, &mut stream, &mut cursor, "203.0.113.8").await;
    eprintln!("{ended} connections ended; {failures} retryable failures seen by the clients");
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The embedded store's disk fills up while a client ingests: ingest answers
/// RESOURCE_EXHAUSTED naming the disk, with RetryInfo; every event
/// acknowledged before is there and readable; the process keeps serving,
/// and ingest works again once space is freed, without a restart.
#[tokio::test]
async fn a_full_disk_refuses_ingest_clearly_and_recovers() {
    use tonic_types::StatusExt;
    let disk = SmallDisk::mount("24m");
    // A filler file stands for whatever else used the disk; removing it
    // frees the space.
    let filler = disk.dir.path().join("filler");
    std::fs::write(&filler, vec![7u8; 8 << 20]).unwrap();
    let url = format!("sqlite://{}/picket.db", disk.dir.path().display());
    let db = TestDb::new(Backend::Sqlite).await;
    let server = tokio::task::spawn_blocking(move || {
        ServerProcess::start(&db, &[("PICKET_DATABASE_URL", url.as_str())])
    })
    .await
    .unwrap();
    let channel = server.channel().await;
    let (_, key) =
        common::tenant_with_key(&channel, "acme", &[pb::Scope::Ingest, pb::Scope::Read]).await;
    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    let batch = |b: usize| pb::IngestRequest {
        events: (0..500)
            .map(|i| {
                let mut e = crate::ingest::login(&format!("b{b}-{i}"), "ok", "198.51.100.20", true);
                e.attributes = (0..8)
                    .map(|k| (format!("note{k}"), "x".repeat(200)))
                    .collect();
                e
            })
            .collect(),
    };
    let mut acked = 0u32;
    let mut refusal = None;
    for b in 0..400 {
        match ingest.ingest(with_key(batch(b), &key)).await {
            Ok(r) => acked += r.into_inner().accepted,
            Err(s) => {
                refusal = Some((b, s));
                break;
            }
        }
    }
    let (failed_batch, s) = refusal.expect("the disk never filled up");
    assert!(acked > 0, "nothing was stored before the disk filled");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("disk space"), "{}", s.message());
    assert!(s.get_details_retry_info().is_some(), "{s:?}");

    // Reads go on: every acknowledged event is there.
    let (mut seen, mut token) = (0usize, String::new());
    loop {
        let page = ingest
            .query_events(with_key(
                pb::QueryEventsRequest {
                    page_size: 500,
                    page_token: token.clone(),
                    ..Default::default()
                },
                &key,
            ))
            .await
            .expect("reads while the disk is full")
            .into_inner();
        seen += page.events.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, acked as usize);

    // Space returns: the refused batch goes in, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ingest.ingest(with_key(batch(failed_batch), &key)).await {
            Ok(r) => {
                assert_eq!(r.into_inner().accepted, 500);
                break;
            }
            Err(s) => {
                assert!(Instant::now() < deadline, "ingest never recovered: {s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    drop(server);
}

/// Opens an HTTP/2 connection and starts an Ingest call whose message says
/// it is 100,000 bytes long but stops after 10, then stalls: the returned
/// handles keep the connection and the call open.
async fn stalled_call(
    addr: std::net::SocketAddr,
    key: &str,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::SendStream<bytes::Bytes>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("http://{addr}/picket.v1.IngestService/Ingest"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-api-key", key)
        .body(())
        .unwrap();
    let (_response, mut body) = client.send_request(req, false).unwrap();
    let mut half = vec![0u8];
    half.extend_from_slice(&100_000u32.to_be_bytes());
    half.extend_from_slice(&[0x0a; 10]);
    body.send_data(bytes::Bytes::from(half), false).unwrap();
    (client, body)
}

/// 1,000 idle connections and 20 calls stalled half way through their
/// message do not slow the callers already connected; past
/// `--max-connections` a new connection is closed at once (and counted),
/// and once the idle ones go, new callers connect again.
#[tokio::test]
async fn idle_and_stalled_connections_leave_other_callers_unaffected() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (server, _db) = tokio::task::spawn_blocking(move || {
        (
            ServerProcess::start(&db, &[("PICKET_MAX_CONNECTIONS", "1100")]),
            db,
        )
    })
    .await
    .unwrap();
    let channel = server.channel().await;
    let (_, key) =
        common::tenant_with_key(&channel, "acme", &[pb::Scope::Ingest, pb::Scope::Read]).await;

    // 1,000 connections that never send a byte, 20 stalled calls.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(stalled_call(server.addr, &key).await);
    }

    // The connected caller goes on as before.
    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    for i in 0..20 {
        let call = ingest.ingest(with_key(
            pb::IngestRequest {
                events: vec![crate::ingest::login(
                    &format!("k{i}"),
                    "ok",
                    "198.51.100.20",
                    true,
                )],
            },
            &key,
        ));
        let r = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("a call stuck behind idle and stalled connections")
            .unwrap()
            .into_inner();
        assert_eq!(r.accepted, 1);
    }

    // Past the cap: 1,000 idle + 20 stalled + this test's channel = 1,021
    // open; of 100 more, those beyond 1,100 are closed at once.
    let mut extra = Vec::new();
    for _ in 0..100 {
        extra.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let reads = extra.iter_mut().map(|c| async move {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncReadExt::read(c, &mut b)
            )
            .await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    });
    let closed = futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    assert!(
        (15..=30).contains(&closed),
        "{closed} of 100 connections past 1,021 open were closed (want the ~21 past 1,100)"
    );
    // The connected caller still works at the cap.
    ingest
        .query_events(with_key(pb::QueryEventsRequest::default(), &key))
        .await
        .expect("the connected caller at the cap");

    // The idle ones go: a new caller connects again.
    drop(idle);
    drop(extra);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await;
        if let Ok(ch) = fresh
            && pb::ingest_service_client::IngestServiceClient::new(ch)
                .query_events(with_key(pb::QueryEventsRequest::default(), &key))
                .await
                .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new caller got in after the idle ones closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, body) = common::http1(server.addr, "GET", "/metrics", &[], vec![]).await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("picket_connections_refused_total") && !l.ends_with(" 0")),
        "no refusal counted"
    );
    drop(stalled);
}
