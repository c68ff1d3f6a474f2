//! `picket bench fanout`: live fan-out of changes. It starts the real
//! server as a child process (so its memory is measured alone), opens N
//! concurrent watch streams over a few HTTP/2 connections, waits until every
//! stream has its snapshot, and then makes U changes at a fixed rate:
//! `--stream incidents` (the default) adds notes to one incident watched with
//! `IncidentService.WatchIncidents`; `--stream decisions` creates one ban per
//! change, watched with `EnforcementService.WatchDecisions`. Every subscriber
//! must receive every change exactly once and in order; the latency of a
//! delivery is from the change's server timestamp (a note's timeline entry
//! `at`, a decision's `created_at`, both stamped by the server when it makes
//! the change, just before its commit) to its arrival at the subscriber, on
//! the same clock. Server memory (RSS) is read from `/proc` before the
//! subscribers connect, with them connected, and at its peak. With
//! `--redis-url` two replicas run on the same Postgres and Redis: the
//! subscribers use one, the changes go through the other.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::cli::client::bench::Latency;
use crate::cli::client::with_key;
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::grpc::pb::enforcement_service_client::EnforcementServiceClient;
use crate::grpc::pb::incident_service_client::IncidentServiceClient;
use crate::storage::DEFAULT_DATABASE_URL;

/// `picket bench fanout` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchFanoutArgs {
    /// Database the server runs on; a fresh tenant is created in it.
    #[arg(long, env = "PICKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Which watch stream: incident changes or enforcement decisions.
    #[arg(long, value_enum, default_value = "incidents")]
    pub stream: FanoutStream,
    /// Concurrent subscribers.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// HTTP/2 connections they share (the server allows 256 streams each by default).
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// Changes to make (notes added to one incident, or bans created).
    #[arg(long, default_value_t = 200)]
    pub updates: usize,
    /// Changes per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Give up waiting for deliveries this long after the last change (the
    /// missing ones are counted as missed).
    #[arg(long, default_value_t = 30)]
    pub timeout_seconds: u64,
    /// Run two replicas on this Redis (the database must be Postgres):
    /// subscribers connect to one, changes are made through the other, so
    /// every delivery crosses replicas through the Redis signal.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Which watch stream `picket bench fanout` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FanoutStream {
    /// IncidentService.WatchIncidents; each change adds a note to one incident.
    Incidents,
    /// EnforcementService.WatchDecisions; each change creates one ban.
    Decisions,
}

/// How long each benchmark ban lasts: a delta's `expires_at` minus this is
/// the decision's `created_at`.
const BAN_SECONDS: u32 = 3600;

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Which stream was measured.
    pub stream: FanoutStream,
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// 1, or 2 when changes cross replicas through Redis.
    pub replicas: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Changes made.
    pub updates: usize,
    /// Changes per second achieved.
    pub update_rate: f64,
    /// Deliveries expected (subscribers × updates) and received.
    pub deliveries_expected: usize,
    /// Deliveries received (each change at most once per subscriber).
    pub deliveries: usize,
    /// Changes some subscriber never received.
    pub missed: usize,
    /// Changes a subscriber received twice or out of order.
    pub duplicates_or_reordered: usize,
    /// Commit → arrival, in milliseconds, over every delivery.
    pub latency_ms: Latency,
    /// 95th percentile of the same, in milliseconds.
    pub latency_p95_ms: f64,
    /// RSS of the server the subscribers use, before they connected, in MiB.
    pub server_rss_idle_mib: f64,
    /// Server RSS with every subscriber connected, before the changes, in MiB.
    pub server_rss_subscribed_mib: f64,
    /// Server RSS at the end of the run, in MiB.
    pub server_rss_end_mib: f64,
    /// Server peak RSS (VmHWM) over the whole run, in MiB.
    pub server_rss_peak_mib: f64,
    /// (subscribed − idle) / subscribers, in KiB.
    pub server_kib_per_subscriber: f64,
    /// Target met: p99 ≤ 250 ms and nothing missed, duplicated or reordered.
    pub target_met: bool,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchFanoutArgs) -> anyhow::Result<()> {
    let r = bench(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("backend            {}", r.backend);
    if r.replicas > 1 {
        println!(
            "replicas           {} (changes through one, subscribers on the other, signalled over Redis)",
            r.replicas
        );
    }
    println!(
        "load               {} {} subscribers on {} connections; {} changes at {:.1}/s",
        r.subscribers,
        match r.stream {
            FanoutStream::Incidents => "WatchIncidents",
            FanoutStream::Decisions => "WatchDecisions",
        },
        r.connections,
        r.updates,
        r.update_rate
    );
    println!(
        "deliveries         {} of {} (missed {}, duplicated or reordered {})",
        r.deliveries, r.deliveries_expected, r.missed, r.duplicates_or_reordered
    );
    println!(
        "latency (commit → subscriber)  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        r.latency_ms.p50, r.latency_p95_ms, r.latency_ms.p99, r.latency_ms.max
    );
    println!(
        "server RSS         idle {:.1} MiB, subscribed {:.1} MiB ({:.1} KiB/subscriber), end {:.1} MiB, peak {:.1} MiB",
        r.server_rss_idle_mib,
        r.server_rss_subscribed_mib,
        r.server_kib_per_subscriber,
        r.server_rss_end_mib,
        r.server_rss_peak_mib
    );
    println!(
        "target             p99 ≤ 250 ms, every subscriber gets every change once, in order: {}",
        if r.target_met { "met" } else { "NOT met" }
    );
    Ok(())
}

/// The server under test, as a child process; killed when dropped.
pub(crate) struct ServerChild {
    /// The process.
    child: std::process::Child,
    /// Where it listens (`host:port`).
    pub addr: String,
}

impl ServerChild {
    /// Starts `picket serve` (this binary) on port 0, detection off so only
    /// the fan-out is measured, and waits for its "serving" line.
    pub(crate) fn start(
        database_url: &str,
        operator: &str,
        redis_url: Option<&str>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the picket binary")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .env("PICKET_DATABASE_URL", database_url)
            .env("PICKET_ADMIN_TOKEN", operator)
            .env("PICKET_DETECTION", "false")
            .env("PICKET_LOG", "warn,picket=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(url) = redis_url {
            cmd.env("PICKET_REDIS_URL", url);
        }
        let mut child = cmd.spawn().context("failed to start picket serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines.next().context("the server exited before serving")??;
            if line.contains("picket serving") {
                let v: serde_json::Value = serde_json::from_str(&line)?;
                break v["addr"].as_str().context("no addr")?.to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, addr })
    }

    /// (RSS, peak RSS) in MiB.
    pub(crate) fn memory(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("cannot read the server's /proc status (Linux only)")?;
        let kib = |field: &str| -> anyhow::Result<f64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(field))
                .with_context(|| format!("no {field} in /proc status"))?;
            Ok(line
                .split_whitespace()
                .nth(1)
                .context("malformed /proc status")?
                .parse::<f64>()?)
        };
        Ok((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one subscriber saw.
struct Seen {
    /// Latencies in µs.
    latencies: Histogram<u64>,
    /// Distinct changes received in order.
    received: usize,
    /// Duplicates or out-of-order changes.
    disorder: usize,
}

/// Runs the benchmark.
pub async fn bench(args: &BenchFanoutArgs) -> anyhow::Result<FanoutReport> {
    anyhow::ensure!(
        args.subscribers > 0 && args.updates > 0,
        "nothing to measure"
    );
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let operator = crate::access::auth::random_secret();
    let backend = if args.database_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let redis = args.redis_url.as_deref();
    anyhow::ensure!(
        redis.is_none() || backend == "postgres",
        "--redis-url needs a Postgres database (replicas share it)"
    );
    // `server` serves the subscribers; `writer` takes the changes (the same
    // process unless --redis-url asks for two replicas).
    let server = ServerChild::start(&args.database_url, &operator, redis)?;
    let other = match redis {
        Some(_) => Some(ServerChild::start(&args.database_url, &operator, redis)?),
        None => None,
    };
    if redis.is_some() {
        for addr in [&server.addr, &other.as_ref().expect("two replicas").addr] {
            redis_up(addr).await?;
        }
    }
    let writer_addr = other.as_ref().map_or(&server.addr, |o| &o.addr).clone();
    let connect = |addr: String| async move {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .context("cannot connect to the server")
    };
    let control = connect(writer_addr).await?;
    let key = tenant_key(&control, &operator).await?;
    let mut incidents = IncidentServiceClient::new(control.clone());
    let mut enforcement = EnforcementServiceClient::new(control.clone());
    let incident = match args.stream {
        FanoutStream::Incidents => {
            incidents
                .create_incident(with_key(
                    pb::CreateIncidentRequest {
                        title: "fan-out benchmark".into(),
                        ..Default::default()
                    },
                    &key,
                )?)
                .await?
                .into_inner()
                .incident
                .context("no incident")?
                .id
        }
        FanoutStream::Decisions => String::new(),
    };
    let (idle_rss, _) = server.memory()?;

    // Subscribers, spread over the connections.
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(server.addr.clone()).await?);
    }
    let ready = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Notify::new());
    let mut tasks = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let channel = channels[i % channels.len()].clone();
        let (key, ready, done, progress) =
            (key.clone(), ready.clone(), done.clone(), progress.clone());
        let updates = args.updates;
        let stream = args.stream;
        tasks.push(tokio::spawn(async move {
            let counters = (ready, done, progress);
            match stream {
                FanoutStream::Incidents => subscriber(channel, key, updates, counters).await,
                FanoutStream::Decisions => {
                    decision_subscriber(channel, key, updates, counters).await
                }
            }
        }));
    }
    wait_for(&ready, args.subscribers, &progress, Duration::from_secs(60))
        .await
        .context("not every subscriber got its snapshot within 60 s")?;
    let (subscribed_rss, _) = server.memory()?;

    // The changes.
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..args.updates {
        ticker.tick().await;
        match args.stream {
            FanoutStream::Incidents => {
                incidents
                    .add_note(with_key(
                        pb::AddNoteRequest {
                            incident_id: incident.clone(),
                            text: format!("n{n}"),
                        },
                        &key,
                    )?)
                    .await
                    .context("AddNote failed")?;
            }
            FanoutStream::Decisions => {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + n as u32 + 1);
                enforcement
                    .create_decision(with_key(
                        pb::CreateDecisionRequest {
                            decision: Some(pb::NewDecision {
                                scope: pb::DecisionScope::Ip as i32,
                                value: ip.to_string(),
                                r#type: pb::DecisionType::Ban as i32,
                                duration_seconds: BAN_SECONDS,
                                reason: format!("n{n}"),
                                ..Default::default()
                            }),
                        },
                        &key,
                    )?)
                    .await
                    .context("CreateDecision failed")?;
            }
        }
    }
    let update_rate = args.updates as f64 / started.elapsed().as_secs_f64();
    let _ = wait_for(
        &done,
        args.subscribers,
        &progress,
        Duration::from_secs(args.timeout_seconds),
    )
    .await;
    let (end_rss, peak_rss) = server.memory()?;
    for t in &tasks {
        t.abort();
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("static bounds");
    let (mut deliveries, mut disorder) = (0usize, 0usize);
    for t in tasks {
        // Aborted tasks (subscribers still waiting) count as missing what they lack.
        if let Ok(Ok(seen)) = t.await {
            hist.add(&seen.latencies).expect("same bounds");
            deliveries += seen.received;
            disorder += seen.disorder;
        }
    }
    let expected = args.subscribers * args.updates;
    let ms = |us: u64| us as f64 / 1000.0;
    let latency_ms = Latency {
        p50: ms(hist.value_at_quantile(0.5)),
        p99: ms(hist.value_at_quantile(0.99)),
        max: ms(hist.max()),
    };
    let missed = expected - deliveries.min(expected);
    Ok(FanoutReport {
        stream: args.stream,
        backend: backend.into(),
        replicas: if other.is_some() { 2 } else { 1 },
        subscribers: args.subscribers,
        connections: channels.len(),
        updates: args.updates,
        update_rate,
        deliveries_expected: expected,
        deliveries,
        missed,
        duplicates_or_reordered: disorder,
        target_met: latency_ms.p99 <= 250.0 && missed == 0 && disorder == 0,
        latency_p95_ms: ms(hist.value_at_quantile(0.95)),
        latency_ms,
        server_rss_idle_mib: idle_rss,
        server_rss_subscribed_mib: subscribed_rss,
        server_rss_end_mib: end_rss,
        server_rss_peak_mib: peak_rss,
        server_kib_per_subscriber: (subscribed_rss - idle_rss) * 1024.0 / args.subscribers as f64,
    })
}

/// Waits (at most 10 s) until the server at `addr` reports its Redis
/// subscription up on `/healthz`.
async fn redis_up(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = http_get(addr, "/healthz").await?;
        if answer.contains(r#""redis":"up""#) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the replica at {addr} never connected to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` on `addr` over plain HTTP/1.1: the whole answer, headers
/// included. The CLI has no HTTP client dependency; the benchmarks only read
/// `/healthz` and `/metrics` this way.
pub(crate) async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: picket\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// A fresh tenant and a read/respond key for it.
pub(crate) async fn tenant_key(channel: &Channel, operator: &str) -> anyhow::Result<String> {
    let mut admin = AdminServiceClient::new(channel.clone());
    let tenant = admin
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: format!("bench-fanout-{}", hex::encode(rand::random::<[u8; 4]>())),
                ..Default::default()
            },
            operator,
        )?)
        .await?
        .into_inner()
        .tenant
        .context("no tenant")?;
    Ok(admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.id,
                name: "bench-fanout".into(),
                scopes: vec![pb::Scope::Read as i32, pb::Scope::Respond as i32],
                expires_at: None,
            },
            operator,
        )?)
        .await?
        .into_inner()
        .secret)
}

/// Waits until `counter` reaches `target` or `limit` passes.
async fn wait_for(
    counter: &AtomicUsize,
    target: usize,
    progress: &Notify,
    limit: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(limit, async {
        loop {
            let notified = progress.notified();
            if counter.load(Ordering::Acquire) >= target {
                return;
            }
            notified.await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out"))
}

/// What a subscriber reports progress to: subscribers with their snapshot,
/// subscribers done, and a wake-up for the waiters.
type Counters = (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<Notify>);

/// One subscriber: reads its snapshot, then records every note's latency and
/// checks that notes arrive once each, in order.
async fn subscriber(
    channel: Channel,
    key: String,
    updates: usize,
    (ready, done, progress): Counters,
) -> anyhow::Result<Seen> {
    let mut stream = IncidentServiceClient::new(channel)
        .watch_incidents(with_key(
            pb::WatchIncidentsRequest {
                filter: None,
                options: None,
            },
            &key,
        )?)
        .await?
        .into_inner();
    let mut seen = Seen {
        latencies: Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds"),
        received: 0,
        disorder: 0,
    };
    let mut next = 0usize;
    while let Some(item) = stream.message().await? {
        match item.item {
            Some(pb::watch_incidents_response::Item::SnapshotComplete(_)) => {
                ready.fetch_add(1, Ordering::AcqRel);
                progress.notify_waiters();
            }
            Some(pb::watch_incidents_response::Item::Change(c)) => {
                let Some(entry) = c.entry else { continue };
                let Some(n) = entry
                    .subject
                    .strip_prefix('n')
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    continue;
                };
                if n != next {
                    seen.disorder += 1;
                    continue;
                }
                next += 1;
                seen.received += 1;
                if let Some(at) = entry.at {
                    let at = chrono::DateTime::from_timestamp(at.seconds, at.nanos.max(0) as u32)
                        .unwrap_or_default();
                    let us = (Utc::now() - at).num_microseconds().unwrap_or(0).max(1) as u64;
                    seen.latencies.saturating_record(us);
                }
                if next == updates {
                    done.fetch_add(1, Ordering::AcqRel);
                    progress.notify_waiters();
                    return Ok(seen);
                }
            }
            _ => {}
        }
    }
    anyhow::bail!("the stream ended early")
}

/// One WatchDecisions subscriber: reads its snapshot, then records every
/// ban's latency and checks that bans arrive once each, in order, with
/// increasing revisions.
async fn decision_subscriber(
    channel: Channel,
    key: String,
    updates: usize,
    (ready, done, progress): Counters,
) -> anyhow::Result<Seen> {
    use pb::watch_decisions_response::Item;
    let mut stream = EnforcementServiceClient::new(channel)
        .watch_decisions(with_key(pb::WatchDecisionsRequest::default(), &key)?)
        .await?
        .into_inner();
    let mut seen = Seen {
        latencies: Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds"),
        received: 0,
        disorder: 0,
    };
    let mut next = 0usize;
    let mut revision = 0u64;
    while let Some(item) = stream.message().await? {
        match item.item {
            Some(Item::SnapshotComplete(c)) => {
                revision = c.revision;
                ready.fetch_add(1, Ordering::AcqRel);
                progress.notify_waiters();
            }
            Some(Item::Deltas(chunk)) => {
                let arrived = Utc::now();
                for d in chunk.deltas {
                    if d.revision <= revision {
                        seen.disorder += 1;
                        continue;
                    }
                    revision = d.revision;
                    let Some(e) = d.decision else { continue };
                    let Some(n) = e
                        .reason
                        .strip_prefix('n')
                        .and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    if n != next || d.kind != pb::DeltaKind::Added as i32 {
                        seen.disorder += 1;
                        continue;
                    }
                    next += 1;
                    seen.received += 1;
                    if let Some(t) = e.expires_at {
                        let created =
                            chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                                .unwrap_or_default()
                                - chrono::Duration::seconds(i64::from(BAN_SECONDS));
                        let us = (arrived - created).num_microseconds().unwrap_or(0).max(1) as u64;
                        seen.latencies.saturating_record(us);
                    }
                }
                if next == updates {
                    done.fetch_add(1, Ordering::AcqRel);
                    progress.notify_waiters();
                    return Ok(seen);
                }
            }
            _ => {}
        }
    }
    anyhow::bail!("the stream ended early")
}
