//! `picket bench detect --storm`: detection end to end under an ingest storm.
//!
//! It starts real `picket serve` processes (detection on) over a fresh
//! database that it creates and drops (Postgres: a new database on the
//! cluster given; SQLite: a temporary file), or targets running servers
//! (`--server`), creates `--tenants` fresh tenants, and sends `--events`
//! events through `IngestStream` as fast as ingest takes them (one window of
//! batches in flight shared by every stream). Kinds of load:
//!
//! - `credential-stuffing`: 2,000 users (`--users`); 75 % HTTP requests and
//!   25 % logins (`--login-percent`), of which 10 % fail (`--fail-percent`),
//!   the failures spread over the users from a pool of 1,000 proxy
//!   addresses; successes from each user's own address.
//! - `quiet`: the same traffic with 1 % of logins failing, from the user's
//!   own address (typos).
//! - `fresh-ips`: a fresh source IP on every event (high cardinality).
//!
//! During the storm, `--admin-bursts` times (spread evenly over it), six
//! failed logins for one administrator account go in one `Ingest` call each;
//! latency is from the ack of the sixth to the arrival on `WatchAlerts` of an
//! alert naming the account. After the last storm ack, a sentinel burst per
//! tenant goes in last: its alert on `WatchAlerts` shows that everything sent
//! before it was evaluated and raised. Independently, the servers'
//! `picket_detect_events_total` (on `/metrics`, polled every 100 ms) shows
//! when the last event was evaluated. The report gives both, measured from
//! the last ack, plus alerts and incidents (listed through the API), the
//! servers' RSS at the end (children only), ingest and detection rates, and
//! detection's capacity: events evaluated per second of pipeline work
//! (`picket_detect_pass_duration_seconds`), which the quiet run compares
//! with the ingest rate.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::cli::client::bench::{Latency, percentiles, stream_batches};
use crate::cli::client::bench_detect::{BenchDetectArgs, RunStore, send};
use crate::cli::client::serve_child::{ServerChild, http_get, metric_sum};
use crate::cli::client::{tenant_with_key, with_key};
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::grpc::pb::alert_service_client::AlertServiceClient;
use crate::grpc::pb::incident_service_client::IncidentServiceClient;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;

/// The load `--storm` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StormKind {
    /// Failed logins for many users from a pool of proxy addresses.
    CredentialStuffing,
    /// Ordinary traffic (1 % of logins fail, from the user's own address).
    Quiet,
    /// A fresh source IP on every event.
    FreshIps,
}

impl StormKind {
    /// Percent of logins that fail unless `--fail-percent` says otherwise.
    fn default_fail_percent(self) -> u32 {
        match self {
            Self::CredentialStuffing => 10,
            Self::Quiet => 1,
            Self::FreshIps => 20,
        }
    }
}

/// Targets of issue 12.
const LAG_TARGET_S: f64 = 5.0;
const BURST_P99_TARGET_MS: f64 = 1000.0;
const CAPACITY_TARGET_RATIO: f64 = 1.2;
const RSS_TARGET_MB: f64 = 300.0;

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    /// The load.
    pub kind: StormKind,
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// Servers the load went to (started by the bench or given with `--server`).
    pub replicas: usize,
    /// Tenants the events were spread over.
    pub tenants: usize,
    /// Storm events sent (without the admin bursts, sentinels and warm-up).
    pub events: usize,
    /// Users per tenant.
    pub users: usize,
    /// Percent of events that are logins.
    pub login_percent: u32,
    /// Percent of logins that fail.
    pub fail_percent: u32,
    /// Failed logins among the storm's events.
    pub failed_logins: usize,
    /// IngestStream streams, HTTP/2 connections, events per batch and
    /// batches in flight (over all streams).
    pub streams: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Events per batch.
    pub batch_size: usize,
    /// Batches in flight, over all streams.
    pub in_flight: usize,
    /// First send → last storm ack, in seconds.
    pub ingest_seconds: f64,
    /// Storm events acknowledged per second over that time.
    pub ingest_events_per_sec: f64,
    /// Ack latency (send → ack) of the storm's batches, in milliseconds.
    pub ack_latency_ms: Latency,
    /// Last ack (the sentinels') → every event sent counted as evaluated by
    /// the servers' `picket_detect_events_total`, in seconds.
    pub evaluated_after_last_ack_s: Option<f64>,
    /// Last ack → the last tenant's sentinel alert on WatchAlerts, in seconds.
    pub sentinel_alert_after_last_ack_s: Option<f64>,
    /// Storm events / (first send → last event evaluated).
    pub detect_events_per_sec: Option<f64>,
    /// Seconds the pipelines spent evaluating (reading feeds, evaluating,
    /// queueing alerts), summed over the servers.
    pub detect_busy_seconds: f64,
    /// Events evaluated per second of that work: detection's capacity under
    /// this load, with ingest sharing the machine.
    pub detect_capacity_events_per_sec: Option<f64>,
    /// Capacity / ingest rate.
    pub capacity_to_ingest: Option<f64>,
    /// Highest `/healthz` `detect_lag_seconds` seen (sampled every 100 ms).
    pub max_detect_lag_s: f64,
    /// Admin bursts sent during the storm.
    pub admin_bursts: usize,
    /// Admin bursts whose alert arrived within the timeout.
    pub admin_alerted: usize,
    /// Ack of the sixth failure → alert naming the account, in milliseconds.
    pub admin_latency_ms: Option<Latency>,
    /// Of that, ack of the sixth → the alert's `created_at` (when the
    /// server's writer began raising it: detection, the feed's visibility
    /// and the alert queue); the rest is the raise and its delivery.
    pub admin_raise_ms: Option<Latency>,
    /// Per burst, the rest: the alert's `created_at` → on WatchAlerts (the
    /// raise transaction, the change log's fence, the hub's wake-up).
    pub admin_after_raise_ms: Option<Latency>,
    /// Distinct alerts at the end (all tenants, listed through the API).
    pub alerts: usize,
    /// Their occurrences (repeats folded into them).
    pub alert_occurrences: u64,
    /// Incidents at the end (all tenants).
    pub incidents: usize,
    /// Alert raises (new and folded) counted by the servers.
    pub alert_raises: f64,
    /// Times evaluation waited on a full alert queue.
    pub alert_queue_full: f64,
    /// Batches the alert writers raised, and the seconds they took
    /// (`picket_alert_write_duration_seconds`).
    pub alert_write_batches: f64,
    /// Seconds the alert writers spent raising (evidence reads and alert
    /// transactions).
    pub alert_write_seconds: f64,
    /// Seconds they spent correlating new alerts into incidents
    /// (`picket_incident_correlation_duration_seconds`).
    pub correlation_seconds: f64,
    /// Seconds of the writers' stages (`picket_alert_write_stage_seconds`:
    /// evidence, raise, handoff) and of the alert transactions' own stages
    /// (`picket_alert_transaction_stage_seconds`: begin, lock, read, fold,
    /// write, commit).
    pub alert_write_stage_seconds: std::collections::BTreeMap<String, f64>,
    /// Time jobs waited in the alert queue for the writer
    /// (`picket_alert_queue_wait_seconds`): the bucket bounds, in seconds,
    /// that hold the median and the 99th percentile of the run's jobs.
    pub alert_queue_wait_le_s: Option<(f64, f64)>,
    /// Per server started by the bench: its figures.
    pub servers: Vec<ServerFigures>,
    /// Targets of issue 12 that apply to this kind, and whether they were met.
    pub targets: Vec<Target>,
}

/// One server's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ServerFigures {
    /// `host:port`.
    pub addr: String,
    /// Events it evaluated during the run.
    pub events_evaluated: f64,
    /// RSS at the end, in MiB (servers started by the bench only).
    pub rss_end_mib: Option<f64>,
    /// Peak RSS, in MiB.
    pub rss_peak_mib: Option<f64>,
}

/// A target and whether it was met.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured against what.
    pub what: String,
    /// The measured value.
    pub value: Option<f64>,
    /// Met.
    pub met: bool,
}

/// Runs the storm benchmark and prints the report.
pub async fn run(args: &BenchDetectArgs, kind: StormKind) -> anyhow::Result<()> {
    let r = bench(args, kind).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let opt = |v: Option<f64>, unit: &str| v.map_or("—".into(), |v| format!("{v:.2} {unit}"));
    println!(
        "load               {:?}: {} events over {} tenant(s), {} users, {} % logins, {} % of them failing ({} failed logins)",
        r.kind, r.events, r.tenants, r.users, r.login_percent, r.fail_percent, r.failed_logins
    );
    println!(
        "servers            {} ({}), {} streams on {} connections, batches of {}, {} in flight",
        r.replicas, r.backend, r.streams, r.connections, r.batch_size, r.in_flight
    );
    println!(
        "ingest             {:.0} events/s ({:.1} s; ack p50 {:.0} ms, p99 {:.0} ms)",
        r.ingest_events_per_sec, r.ingest_seconds, r.ack_latency_ms.p50, r.ack_latency_ms.p99
    );
    println!(
        "last ack →         last event evaluated {}, last sentinel alert {}",
        opt(r.evaluated_after_last_ack_s, "s"),
        opt(r.sentinel_alert_after_last_ack_s, "s")
    );
    println!(
        "detection          {} overall, capacity {} ({} × ingest), max lag {:.1} s",
        opt(r.detect_events_per_sec, "events/s"),
        opt(r.detect_capacity_events_per_sec, "events/s"),
        r.capacity_to_ingest
            .map_or("—".into(), |c| format!("{c:.2}")),
        r.max_detect_lag_s
    );
    if let Some(l) = &r.admin_raise_ms {
        println!(
            "admin ack → raise  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (alert created_at)",
            l.p50, l.p99, l.max
        );
    }
    if let Some(l) = &r.admin_after_raise_ms {
        println!(
            "admin raise → WatchAlerts  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            l.p50, l.p99, l.max
        );
    }
    match &r.admin_latency_ms {
        Some(l) => println!(
            "admin bursts       {} of {} alerted; ack → alert p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            r.admin_alerted, r.admin_bursts, l.p50, l.p99, l.max
        ),
        None => println!(
            "admin bursts       {} of {} alerted",
            r.admin_alerted, r.admin_bursts
        ),
    }
    println!(
        "alerts             {} ({} occurrences, {:.0} raises), {} incidents, queue full {:.0} times",
        r.alerts, r.alert_occurrences, r.alert_raises, r.incidents, r.alert_queue_full
    );
    println!(
        "alert writer       {:.0} batches: raising {:.1} s, correlating {:.1} s",
        r.alert_write_batches, r.alert_write_seconds, r.correlation_seconds
    );
    let stages: Vec<String> = r
        .alert_write_stage_seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.1} s"))
        .collect();
    println!("writer stages      {}", stages.join(", "));
    if let Some((p50, p99)) = r.alert_queue_wait_le_s {
        println!("alert queue wait   p50 ≤ {p50} s, p99 ≤ {p99} s (histogram bucket bounds)");
    }
    for s in &r.servers {
        println!(
            "server {:<21} evaluated {:.0}; RSS end {}, peak {}",
            s.addr,
            s.events_evaluated,
            opt(s.rss_end_mib, "MiB"),
            opt(s.rss_peak_mib, "MiB")
        );
    }
    for t in &r.targets {
        println!(
            "target             {}: {} ({})",
            t.what,
            if t.met { "met" } else { "NOT met" },
            t.value.map_or("—".into(), |v| format!("{v:.2}"))
        );
    }
    Ok(())
}

/// Where the run's servers come from, and what to clean up.
enum Servers {
    /// Started here, over a store created here.
    Children {
        children: Vec<ServerChild>,
        store: RunDb,
    },
    /// Running elsewhere.
    Given(Vec<String>),
}

/// The run's fresh database.
enum RunDb {
    Postgres(crate::storage::scratch::ScratchDb),
    Other(RunStore),
}

/// Runs the storm benchmark.
pub async fn bench(args: &BenchDetectArgs, kind: StormKind) -> anyhow::Result<StormReport> {
    anyhow::ensure!(args.events >= 1, "--events must be at least 1");
    anyhow::ensure!(
        (1..=10_000).contains(&args.tenants),
        "--tenants must be 1..10000"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.users),
        "--users must be 1..1000000"
    );
    anyhow::ensure!(args.admin_bursts <= 250, "--admin-bursts must be 0..250");
    anyhow::ensure!(
        (1..=1000).contains(&args.batch_size),
        "--batch-size must be 1..1000"
    );
    anyhow::ensure!(
        args.clients >= 1 && args.in_flight >= 1,
        "--clients and --in-flight must be at least 1"
    );
    anyhow::ensure!(args.login_percent <= 100, "--login-percent must be 0..100");
    let fail_percent = args
        .fail_percent
        .unwrap_or_else(|| kind.default_fail_percent());
    anyhow::ensure!(fail_percent <= 100, "--fail-percent must be 0..100");

    let (servers, operator, backend) = if args.servers.is_empty() {
        let operator = crate::access::auth::random_secret();
        let url = args.database_url.as_deref();
        let is_pg = url.is_some_and(|u| u.starts_with("postgres"));
        anyhow::ensure!(
            args.replicas == 1 || (is_pg && args.redis_url.is_some()),
            "--replicas above 1 needs a Postgres --database-url and --redis-url"
        );
        let store = if is_pg {
            RunDb::Postgres(
                crate::storage::scratch::ScratchDb::create(
                    url.expect("checked"),
                    "picket_bench_storm",
                )
                .await?,
            )
        } else {
            RunDb::Other(RunStore::open(url)?)
        };
        let db_url = match &store {
            RunDb::Postgres(db) => db.url.clone(),
            RunDb::Other(s) => s.url.clone(),
        };
        let mut env = vec![("PICKET_DETECTION".to_owned(), "true".to_owned())];
        if let Some(r) = &args.redis_url {
            env.push(("PICKET_REDIS_URL".to_owned(), r.clone()));
        }
        for kv in &args.serve_env {
            let (k, v) = kv.split_once('=').context("--serve-env takes NAME=VALUE")?;
            anyhow::ensure!(k.starts_with("PICKET_"), "--serve-env sets PICKET_* only");
            env.push((k.to_owned(), v.to_owned()));
        }
        let mut children = Vec::new();
        for _ in 0..args.replicas {
            match ServerChild::start(&db_url, &operator, &env) {
                Ok(c) => children.push(c),
                Err(e) => {
                    drop(children);
                    cleanup(store, args.keep_store).await;
                    return Err(e);
                }
            }
        }
        let backend = if is_pg { "postgres" } else { "sqlite" };
        (Servers::Children { children, store }, operator, backend)
    } else {
        let operator = args
            .admin_token
            .as_ref()
            .context("--server needs --admin-token (or PICKET_ADMIN_TOKEN) to create tenants")?
            .expose_secret()
            .to_owned();
        (
            Servers::Given(args.servers.clone()),
            operator,
            "unknown (external servers)",
        )
    };
    let addrs: Vec<String> = match &servers {
        Servers::Children { children, .. } => children.iter().map(|c| c.addr.clone()).collect(),
        Servers::Given(urls) => urls
            .iter()
            .map(|u| {
                u.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned()
            })
            .collect(),
    };
    let result = measure(args, kind, fail_percent, &addrs, &operator, &servers).await;
    let result = result.map(|mut r| {
        r.backend = backend.into();
        r
    });
    if let Servers::Children { children, store } = servers {
        drop(children);
        cleanup(store, args.keep_store).await;
    }
    result
}

/// Drops the run's database (or keeps it with `--keep-store`).
async fn cleanup(store: RunDb, keep: bool) {
    match store {
        RunDb::Postgres(db) if keep => eprintln!("store kept: {}", db.url),
        RunDb::Postgres(db) => {
            let name = db.name.clone();
            if let Err(e) = db.drop_now().await {
                eprintln!("could not drop the run's database {name}: {e:#}");
            }
        }
        RunDb::Other(s) => s.finish(keep),
    }
}

/// Everything between the servers being up and their end.
async fn measure(
    args: &BenchDetectArgs,
    kind: StormKind,
    fail_percent: u32,
    addrs: &[String],
    operator: &str,
    servers: &Servers,
) -> anyhow::Result<StormReport> {
    let connect = |addr: String| async move {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))
    };
    let mut channels = Vec::new();
    for i in 0..args.clients {
        channels.push(connect(addrs[i % addrs.len()].clone()).await?);
    }
    wait_for_detection(addrs).await?;

    // Tenants, keys, and one WatchAlerts stream each.
    let run_id = hex::encode(rand::random::<[u8; 4]>());
    let mut admin = AdminServiceClient::new(channels[0].clone());
    let mut keys = Vec::with_capacity(args.tenants);
    for t in 0..args.tenants {
        let (_, key) = tenant_with_key(
            &mut admin,
            operator,
            format!("storm-{run_id}-{t}"),
            "bench-storm",
            &[pb::Scope::Ingest, pb::Scope::Read],
        )
        .await?;
        keys.push(key);
    }
    let mut watchers = Vec::with_capacity(args.tenants);
    for (t, key) in keys.iter().enumerate() {
        let channel = channels[t % channels.len()].clone();
        watchers.push(Arc::new(
            EntityWatcher::start(AlertServiceClient::new(channel), key).await?,
        ));
    }
    let timeout = Duration::from_secs(args.timeout_seconds);

    // Warm-up (not measured): detection raises an alert for tenant 0.
    let mut ingest = IngestServiceClient::new(channels[0].clone());
    let warm_ip = "192.0.2.1";
    let acked = send(
        &mut ingest,
        &keys[0],
        burst(&format!("{run_id}-warm"), "warmup@example.com", warm_ip),
        true,
    )
    .await?;
    watchers[0]
        .wait_for(warm_ip, acked, timeout * 3)
        .await
        .context("the warm-up burst raised no alert: is detection running?")?;

    let before = scrape(addrs).await?;
    let extra = 6 * (args.admin_bursts + args.tenants);
    let expected = before.events + (args.events + extra) as f64;
    let poller = Poller::start(addrs.to_vec(), expected);

    // The storm: S streams, stream s for tenant s % tenants, one window of
    // batches in flight shared by all of them.
    let streams = args.clients.max(args.tenants);
    let window = Arc::new(tokio::sync::Semaphore::new(args.clients * args.in_flight));
    let acked_events = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let shapes: Vec<Arc<Shape>> = (0..args.tenants)
        .map(|t| {
            Arc::new(Shape {
                kind,
                tenant: t,
                events: args.events / args.tenants + usize::from(t < args.events % args.tenants),
                users: args.users as u64,
                login_percent: u64::from(args.login_percent),
                fail_percent: u64::from(fail_percent),
                run: format!("{run_id}-{t}"),
                batch_size: args.batch_size,
            })
        })
        .collect();
    let failed_logins: usize = shapes.iter().map(|s| s.failed_logins()).sum();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for s in 0..streams {
        let t = s % args.tenants;
        let shape = shapes[t].clone();
        let of_tenant = (streams - t).div_ceil(args.tenants);
        let nth = s / args.tenants;
        let batches = (nth..shape.batches())
            .step_by(of_tenant)
            .map(move |b| shape.batch(b));
        let channel = channels[s % channels.len()].clone();
        let key = keys[t].clone();
        let (window, acked_events) = (window.clone(), acked_events.clone());
        tasks.push(tokio::spawn(async move {
            stream_batches(s, channel, &key, batches, window, None, Some(acked_events)).await
        }));
    }

    // The admin bursts, spread evenly over the storm, for tenant 0.
    let bursts = {
        let mut ingest = IngestServiceClient::new(channels[0].clone());
        let key = keys[0].clone();
        let watcher = watchers[0].clone();
        let mut progress = acked_events.subscribe();
        let (n, total, run) = (args.admin_bursts, args.events, run_id.clone());
        tokio::spawn(async move {
            let mut waits = Vec::with_capacity(n);
            for j in 0..n {
                let at = (j + 1) * total / (n + 1);
                let _ = progress.wait_for(|a| *a >= at).await;
                let actor = format!("admin-{j}@example.com");
                let ip = format!("198.51.100.{}", j + 1);
                let mut acked = Instant::now();
                for e in burst(&format!("{run}-admin-{j}"), &actor, &ip) {
                    acked = send(&mut ingest, &key, vec![e], true).await?;
                }
                let acked_wall = Utc::now();
                let watcher = watcher.clone();
                waits.push(tokio::spawn(async move {
                    let arrived = watcher.wait_for(&actor, acked, timeout).await?;
                    // The alert's `created_at` is the server's clock (this
                    // machine's) when the writer began raising it.
                    let raised = watcher
                        .created(&actor)
                        .and_then(|c| (c - acked_wall).to_std().ok());
                    Some((arrived.saturating_duration_since(acked), raised))
                }));
            }
            let mut latencies = Vec::new();
            for w in waits {
                if let Some(d) = w.await.context("burst waiter panicked")? {
                    latencies.push(d);
                }
            }
            anyhow::Ok(latencies)
        })
    };

    let mut hist =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
    let mut last_storm_ack = started;
    for t in tasks {
        let run = t.await.context("stream panicked")??;
        hist.add(&run.latencies).expect("same bounds");
        last_storm_ack = last_storm_ack.max(run.last_ack.unwrap_or(started));
    }
    let ingest_seconds = last_storm_ack.duration_since(started).as_secs_f64();

    // Sentinels: one burst per tenant, after every storm batch was acked.
    let mut sentinel_acks = Vec::with_capacity(args.tenants);
    for (t, key) in keys.iter().enumerate() {
        let ip = sentinel_ip(t);
        let mut ingest = IngestServiceClient::new(channels[t % channels.len()].clone());
        let acked = send(
            &mut ingest,
            key,
            burst(
                &format!("{run_id}-{t}-sentinel"),
                "sentinel@example.com",
                &ip,
            ),
            true,
        )
        .await?;
        sentinel_acks.push(acked);
    }
    let last_ack = sentinel_acks
        .iter()
        .copied()
        .max()
        .unwrap_or(last_storm_ack);
    let drain = Duration::from_secs(args.drain_timeout_seconds);
    let mut sentinel_at: Option<Instant> = Some(last_ack);
    for (t, w) in watchers.iter().enumerate() {
        match w.wait_for(&sentinel_ip(t), sentinel_acks[t], drain).await {
            Some(at) => sentinel_at = sentinel_at.map(|s| s.max(at)),
            None => sentinel_at = None,
        }
    }
    let admin_latencies = bursts.await.context("burst task panicked")??;
    let evaluated_at = poller.done(drain).await;

    // Let the alert writer finish correlating (its queue empty) before counting.
    let deadline = Instant::now() + drain;
    let mut after = scrape(addrs).await?;
    while after.queue_depth > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scrape(addrs).await?;
    }
    let max_lag = poller.max_lag();
    poller.stop();

    let (mut alerts, mut occurrences, mut incidents) = (0usize, 0u64, 0usize);
    for (t, key) in keys.iter().enumerate() {
        let channel = channels[t % channels.len()].clone();
        let (a, o) = count_alerts(channel.clone(), key).await?;
        alerts += a;
        occurrences += o;
        incidents += count_incidents(channel, key).await?;
    }
    let memory: Vec<Option<(f64, f64)>> = match servers {
        Servers::Children { children, .. } => children.iter().map(|c| c.memory().ok()).collect(),
        Servers::Given(urls) => urls.iter().map(|_| None).collect(),
    };
    let servers_fig: Vec<ServerFigures> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| ServerFigures {
            addr: addr.clone(),
            events_evaluated: after.per_server[i] - before.per_server[i],
            rss_end_mib: memory[i].map(|m| m.0),
            rss_peak_mib: memory[i].map(|m| m.1),
        })
        .collect();

    let since_last =
        |t: Option<Instant>| t.map(|t| t.saturating_duration_since(last_ack).as_secs_f64());
    let evaluated_after_last_ack_s = since_last(evaluated_at);
    let sentinel_alert_after_last_ack_s = since_last(sentinel_at);
    let ingest_events_per_sec = args.events as f64 / ingest_seconds.max(1e-9);
    let detect_events_per_sec =
        evaluated_at.map(|t| args.events as f64 / t.duration_since(started).as_secs_f64());
    let busy = after.busy - before.busy;
    let evaluated = after.events - before.events;
    let capacity = (busy > 0.0).then(|| evaluated / busy);
    let capacity_to_ingest = capacity.map(|c| c / ingest_events_per_sec);
    let admin_raise_ms = percentiles(
        &admin_latencies
            .iter()
            .filter_map(|(_, r)| *r)
            .collect::<Vec<_>>(),
    );
    let admin_after_raise_ms = percentiles(
        &admin_latencies
            .iter()
            .filter_map(|(d, r)| r.map(|r| d.saturating_sub(r)))
            .collect::<Vec<_>>(),
    );
    let admin_latencies: Vec<Duration> = admin_latencies.iter().map(|(d, _)| *d).collect();
    let admin_latency_ms = percentiles(&admin_latencies);

    let mut targets = Vec::new();
    match kind {
        StormKind::CredentialStuffing => {
            targets.push(Target {
                what: format!("last ack → last event evaluated ≤ {LAG_TARGET_S} s"),
                value: evaluated_after_last_ack_s,
                met: evaluated_after_last_ack_s.is_some_and(|v| v <= LAG_TARGET_S),
            });
            if args.admin_bursts > 0 {
                let p99 = admin_latency_ms.as_ref().map(|l| l.p99);
                targets.push(Target {
                    what: format!(
                        "admin burst ack → alert p99 ≤ {BURST_P99_TARGET_MS} ms, none missed"
                    ),
                    value: p99,
                    met: admin_latencies.len() == args.admin_bursts
                        && p99.is_some_and(|p| p <= BURST_P99_TARGET_MS),
                });
            }
        }
        StormKind::Quiet => targets.push(Target {
            what: format!("detection capacity ≥ {CAPACITY_TARGET_RATIO} × ingest rate"),
            value: capacity_to_ingest,
            met: capacity_to_ingest.is_some_and(|c| c >= CAPACITY_TARGET_RATIO),
        }),
        StormKind::FreshIps => {
            let rss = servers_fig
                .iter()
                .filter_map(|s| s.rss_end_mib)
                .reduce(f64::max);
            targets.push(Target {
                what: format!("server RSS at the end ≤ {RSS_TARGET_MB} MB"),
                value: rss.map(|m| m * 1.048_576),
                met: rss.is_some_and(|m| m * 1.048_576 <= RSS_TARGET_MB),
            });
        }
    }

    Ok(StormReport {
        kind,
        backend: String::new(),
        replicas: addrs.len(),
        tenants: args.tenants,
        events: args.events,
        users: args.users,
        login_percent: args.login_percent,
        fail_percent,
        failed_logins,
        streams,
        connections: channels.len(),
        batch_size: args.batch_size,
        in_flight: args.clients * args.in_flight,
        ingest_seconds,
        ingest_events_per_sec,
        ack_latency_ms: Latency {
            p50: hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99: hist.value_at_quantile(0.99) as f64 / 1000.0,
            max: hist.max() as f64 / 1000.0,
        },
        evaluated_after_last_ack_s,
        sentinel_alert_after_last_ack_s,
        detect_events_per_sec,
        detect_busy_seconds: busy,
        detect_capacity_events_per_sec: capacity,
        capacity_to_ingest,
        max_detect_lag_s: max_lag,
        admin_bursts: args.admin_bursts,
        admin_alerted: admin_latencies.len(),
        admin_latency_ms,
        admin_raise_ms,
        admin_after_raise_ms,
        alerts,
        alert_occurrences: occurrences,
        incidents,
        alert_raises: after.raises - before.raises,
        alert_queue_full: after.queue_full - before.queue_full,
        alert_write_batches: after.write_batches - before.write_batches,
        alert_write_seconds: after.write_seconds - before.write_seconds,
        correlation_seconds: after.correlation_seconds - before.correlation_seconds,
        alert_write_stage_seconds: after
            .stages
            .iter()
            .map(|(k, v)| (k.clone(), v - before.stages.get(k).copied().unwrap_or(0.0)))
            .collect(),
        alert_queue_wait_le_s: bucket_quantiles(&before.queue_wait, &after.queue_wait),
        servers: servers_fig,
        targets,
    })
}

/// Waits (at most 60 s) until some server reports that it runs detection
/// (`/healthz` `detect_lag_seconds` is a number).
async fn wait_for_detection(addrs: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for addr in addrs {
            let body = http_get(addr, "/healthz").await.unwrap_or_default();
            if serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|v| v["detect_lag_seconds"].is_number())
            {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no server runs detection (healthz detect_lag_seconds stayed null)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sentinel_ip(tenant: usize) -> String {
    format!("203.0.113.{}", tenant % 250 + 1)
}

/// Counters summed over the servers.
#[derive(Debug, Clone, Default)]
struct Scrape {
    /// `picket_detect_events_total`.
    events: f64,
    /// The same per server, in `addrs` order.
    per_server: Vec<f64>,
    /// `picket_detect_pass_duration_seconds_sum`.
    busy: f64,
    /// `picket_alerts_raised_total`.
    raises: f64,
    /// `picket_alert_queue_full_total`.
    queue_full: f64,
    /// `picket_alert_queue_depth`.
    queue_depth: f64,
    /// `picket_alert_write_duration_seconds` count and sum.
    write_batches: f64,
    write_seconds: f64,
    correlation_seconds: f64,
    /// Stage sums by `metric/stage`.
    stages: std::collections::BTreeMap<String, f64>,
    /// `picket_alert_queue_wait_seconds` buckets: (le, cumulative count).
    queue_wait: Vec<(f64, f64)>,
}

/// The buckets of histogram series `metric` (a `_bucket` series without
/// other labels): (upper bound, cumulative count), in order.
fn buckets(text: &str, metric: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?.strip_prefix("{le=\"")?;
            let (le, rest) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bounds holding the median and the 99th percentile of the
/// samples added between two readings of one histogram's buckets.
fn bucket_quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<(f64, f64)> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .enumerate()
        .map(|(i, (le, n))| (*le, n - before.get(i).map_or(0.0, |b| b.1)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let at = |q: f64| {
        delta
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    Some((at(0.5), at(0.99)))
}

/// The sum of histogram `metric` (a `_sum` series) for label `stage`.
fn stage_sum(text: &str, metric: &str, stage: &str) -> f64 {
    let label = format!("stage=\"{stage}\"");
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(&label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(addrs: &[String]) -> anyhow::Result<Scrape> {
    let mut s = Scrape::default();
    for addr in addrs {
        let text = http_get(addr, "/metrics").await?;
        let events = metric_sum(&text, "picket_detect_events_total");
        s.events += events;
        s.per_server.push(events);
        s.busy += metric_sum(&text, "picket_detect_pass_duration_seconds_sum");
        s.raises += metric_sum(&text, "picket_alerts_raised_total");
        s.queue_full += metric_sum(&text, "picket_alert_queue_full_total");
        s.queue_depth += metric_sum(&text, "picket_alert_queue_depth");
        s.write_batches += metric_sum(&text, "picket_alert_write_duration_seconds_count");
        s.write_seconds += metric_sum(&text, "picket_alert_write_duration_seconds_sum");
        s.correlation_seconds +=
            metric_sum(&text, "picket_incident_correlation_duration_seconds_sum");
        let waits = buckets(&text, "picket_alert_queue_wait_seconds_bucket");
        if s.queue_wait.is_empty() {
            s.queue_wait = waits;
        } else {
            for ((_, n), (_, m)) in s.queue_wait.iter_mut().zip(waits) {
                *n += m;
            }
        }
        for (metric, stages) in [
            (
                "picket_alert_write_stage_seconds_sum",
                &["evidence", "raise", "handoff"][..],
            ),
            (
                "picket_alert_transaction_stage_seconds_sum",
                &["begin", "lock", "read", "fold", "encode", "write", "commit"][..],
            ),
        ] {
            for stage in stages {
                *s.stages.entry((*stage).to_owned()).or_default() +=
                    stage_sum(&text, metric, stage);
            }
        }
    }
    Ok(s)
}

/// Polls the servers every 100 ms: when their evaluated-events counter
/// reaches the expected total, and the highest detection lag on `/healthz`.
struct Poller {
    state: Arc<Mutex<PollState>>,
    reached: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct PollState {
    reached_at: Option<Instant>,
    max_lag: f64,
}

impl Poller {
    fn start(addrs: Vec<String>, expected: f64) -> Self {
        let state: Arc<Mutex<PollState>> = Arc::default();
        let reached = Arc::new(Notify::new());
        let task = {
            let (state, reached) = (state.clone(), reached.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let mut lag = 0.0f64;
                    for addr in &addrs {
                        if let Ok(body) = http_get(addr, "/healthz").await
                            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
                        {
                            lag = lag.max(v["detect_lag_seconds"].as_f64().unwrap_or(0.0));
                        }
                    }
                    let events = scrape(&addrs).await.map(|s| s.events).unwrap_or(0.0);
                    let now = Instant::now();
                    let mut st = state.lock().expect("not poisoned");
                    st.max_lag = st.max_lag.max(lag);
                    if st.reached_at.is_none() && events >= expected {
                        st.reached_at = Some(now);
                        reached.notify_waiters();
                    }
                }
            })
        };
        Self {
            state,
            reached,
            task,
        }
    }

    /// When the counter reached the total, waiting at most `limit`.
    async fn done(&self, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.reached.notified();
            if let Some(t) = self.state.lock().expect("not poisoned").reached_at {
                return Some(t);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return self.state.lock().expect("not poisoned").reached_at;
            }
        }
    }

    fn max_lag(&self) -> f64 {
        self.state.lock().expect("not poisoned").max_lag
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// Per entity value: the first alert naming it (arrival, `created_at`).
type FirstAlerts = HashMap<String, (Instant, Option<DateTime<Utc>>)>;

/// Follows one tenant's `WatchAlerts` and records, for every entity value an
/// alert names, when the first alert naming it arrived. (The storm raises
/// thousands of alerts; waiters look their entity up instead of scanning.)
struct EntityWatcher {
    /// Per entity value: when the first alert naming it arrived, and that
    /// alert's `created_at`.
    first: Arc<Mutex<FirstAlerts>>,
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl EntityWatcher {
    async fn start(mut client: AlertServiceClient<Channel>, key: &str) -> anyhow::Result<Self> {
        let mut stream = client
            .watch_alerts(with_key(
                pb::WatchAlertsRequest {
                    filter: None,
                    options: Some(pb::WatchOptions {
                        after_cursor: String::new(),
                        heartbeat_interval_seconds: 1,
                    }),
                },
                key,
            )?)
            .await
            .context("failed to open WatchAlerts")?
            .into_inner();
        let first: Arc<Mutex<FirstAlerts>> = Arc::default();
        let notify = Arc::new(Notify::new());
        let task = {
            let (first, notify) = (first.clone(), notify.clone());
            tokio::spawn(async move {
                while let Ok(Some(item)) = stream.message().await {
                    if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item {
                        let now = Instant::now();
                        let at = a.created_at.and_then(|t| {
                            DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                        });
                        let mut first = first.lock().expect("not poisoned");
                        for e in a.entities {
                            first.entry(e.value).or_insert((now, at));
                        }
                        drop(first);
                        notify.notify_waiters();
                    }
                }
            })
        };
        Ok(Self {
            first,
            notify,
            task,
        })
    }

    /// `created_at` of the first alert naming `value`, if one arrived.
    fn created(&self, value: &str) -> Option<DateTime<Utc>> {
        self.first
            .lock()
            .expect("not poisoned")
            .get(value)
            .and_then(|(_, created)| *created)
    }

    /// Arrival of the first alert naming `value`, waiting at most `timeout`
    /// past `since`.
    async fn wait_for(&self, value: &str, since: Instant, timeout: Duration) -> Option<Instant> {
        let deadline = since + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some((t, _)) = self.first.lock().expect("not poisoned").get(value) {
                return Some(*t);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return self
                    .first
                    .lock()
                    .expect("not poisoned")
                    .get(value)
                    .map(|(t, _)| *t);
            }
        }
    }
}

impl Drop for EntityWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// (distinct alerts, their occurrences) of a tenant.
async fn count_alerts(channel: Channel, key: &str) -> anyhow::Result<(usize, u64)> {
    let mut client = AlertServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (mut n, mut occurrences, mut token) = (0, 0u64, String::new());
    let mut ids = HashSet::new();
    loop {
        let page = client
            .list_alerts(with_key(
                pb::ListAlertsRequest {
                    filter: None,
                    page_size: 100,
                    page_token: token,
                },
                key,
            )?)
            .await
            .context("ListAlerts failed")?
            .into_inner();
        for a in &page.alerts {
            if ids.insert(a.id.clone()) {
                n += 1;
                occurrences += u64::from(a.occurrence_count);
            }
        }
        if page.next_page_token.is_empty() {
            return Ok((n, occurrences));
        }
        token = page.next_page_token;
    }
}

/// Incidents of a tenant.
async fn count_incidents(channel: Channel, key: &str) -> anyhow::Result<usize> {
    let mut client = IncidentServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (mut n, mut token) = (0, String::new());
    loop {
        let page = client
            .list_incidents(with_key(
                pb::ListIncidentsRequest {
                    filter: None,
                    page_size: 100,
                    page_token: token,
                },
                key,
            )?)
            .await
            .context("ListIncidents failed")?
            .into_inner();
        n += page.incidents.len();
        if page.next_page_token.is_empty() {
            return Ok(n);
        }
        token = page.next_page_token;
    }
}

/// Six failed password logins for `actor` from `ip`, now.
fn burst(tag: &str, actor: &str, ip: &str) -> Vec<pb::Event> {
    let now = crate::grpc::convert::timestamp(Utc::now());
    (0..6)
        .map(|n| pb::Event {
            occurred_at: Some(now),
            event_type: "user.login".into(),
            idempotency_key: format!("{tag}-{n}"),
            actor: actor.into(),
            action: "login".into(),
            resource: "/auth/login".into(),
            outcome: pb::Outcome::Failure as i32,
            source_ip: ip.into(),
            source_system: "picket-bench".into(),
            service: "accounts".into(),
            environment: "production".into(),
            auth: Some(pb::AuthDetails {
                method: "password".into(),
                failure_reason: "bad_password".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// One tenant's storm: which event number `i` is, deterministically.
struct Shape {
    kind: StormKind,
    tenant: usize,
    events: usize,
    users: u64,
    login_percent: u64,
    fail_percent: u64,
    run: String,
    batch_size: usize,
}

/// What event `i` of a storm is.
enum Kind {
    Http,
    Login { failed: bool },
    Api,
}

impl Shape {
    fn batches(&self) -> usize {
        self.events.div_ceil(self.batch_size)
    }

    /// splitmix64 of the event number (and tenant): the event's dice.
    fn dice(&self, i: u64) -> u64 {
        let mut z = i
            .wrapping_add((self.tenant as u64) << 40)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn kind_of(&self, r: u64) -> Kind {
        let roll = r % 100;
        let failed = (r >> 8) % 100 < self.fail_percent;
        match self.kind {
            StormKind::FreshIps => match roll {
                _ if roll < self.login_percent => Kind::Login { failed },
                _ if roll < self.login_percent + (100 - self.login_percent) * 7 / 8 => Kind::Http,
                _ => Kind::Api,
            },
            _ if roll < self.login_percent => Kind::Login { failed },
            _ => Kind::Http,
        }
    }

    fn failed_logins(&self) -> usize {
        (0..self.events as u64)
            .filter(|i| matches!(self.kind_of(self.dice(*i)), Kind::Login { failed: true }))
            .count()
    }

    /// Batch `b` of this tenant's storm, dated now.
    fn batch(&self, b: usize) -> Vec<pb::Event> {
        let now = crate::grpc::convert::timestamp(Utc::now());
        let from = b * self.batch_size;
        let to = (from + self.batch_size).min(self.events);
        (from..to).map(|i| self.event(i as u64, now)).collect()
    }

    fn event(&self, i: u64, now: prost_types::Timestamp) -> pb::Event {
        let r = self.dice(i);
        let user = (r >> 16) % self.users;
        let home = format!(
            "10.{}.{}.{}",
            100 + (user >> 16),
            (user >> 8) & 255,
            user & 255
        );
        let source_ip = match self.kind {
            StormKind::FreshIps => format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            _ => home,
        };
        let mut e = pb::Event {
            occurred_at: Some(now),
            idempotency_key: format!("{}-{i}", self.run),
            actor: format!("user{user}@example.com"),
            source_ip,
            source_system: "picket-bench".into(),
            service: "web".into(),
            environment: "production".into(),
            ..Default::default()
        };
        match self.kind_of(r) {
            Kind::Login { failed } => {
                if failed && self.kind == StormKind::CredentialStuffing {
                    // Credential stuffing: through a pool of 1,000 proxies.
                    let p = (r >> 40) % 1000;
                    e.source_ip = format!("172.16.{}.{}", p / 250, p % 250 + 1);
                }
                e.event_type = "user.login".into();
                e.action = "login".into();
                e.resource = "/auth/login".into();
                e.service = "accounts".into();
                e.outcome = if failed {
                    pb::Outcome::Failure
                } else {
                    pb::Outcome::Success
                } as i32;
                e.auth = Some(pb::AuthDetails {
                    method: "password".into(),
                    mfa_used: !failed,
                    failure_reason: if failed {
                        "bad_password".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                });
            }
            Kind::Http => {
                const PATHS: [&str; 4] = [
                    "/api/v1/orders",
                    "/api/v1/users/42",
                    "/api/v1/reports",
                    "/static/app.js",
                ];
                let path = PATHS[((r >> 32) % 4) as usize];
                let status = if (r >> 36).is_multiple_of(50) {
                    404
                } else {
                    200
                };
                e.event_type = "http_request".into();
                e.action = "GET".into();
                e.resource = path.into();
                e.outcome = if status < 400 {
                    pb::Outcome::Success
                } else {
                    pb::Outcome::Failure
                } as i32;
                e.http = Some(pb::HttpDetails {
                    method: "GET".into(),
                    path: path.into(),
                    status_code: status,
                    latency_ms: ((r >> 44) % 400) as f64,
                    bytes_in: 0,
                    bytes_out: 1000 + (r >> 48) % 5000,
                    user_agent: "Mozilla/5.0 (X11; Linux x86_64)".into(),
                    route: path.into(),
                });
            }
            Kind::Api => {
                e.event_type = "api.call".into();
                e.action = "POST".into();
                e.resource = "/api/v1/reports".into();
                e.outcome = pb::Outcome::Success as i32;
            }
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(kind: StormKind, fail_percent: u64) -> Shape {
        Shape {
            kind,
            tenant: 0,
            events: 100_000,
            users: 2000,
            login_percent: 25,
            fail_percent,
            run: "t".into(),
            batch_size: 1000,
        }
    }

    #[test]
    fn queue_wait_quantiles_come_from_the_run_s_buckets() {
        let text = |a: u32, b: u32, c: u32| {
            format!(
                "picket_alert_queue_wait_seconds_bucket{{le=\"0.1\"}} {a}\n\
                 picket_alert_queue_wait_seconds_bucket{{le=\"1\"}} {b}\n\
                 picket_alert_queue_wait_seconds_bucket{{le=\"+Inf\"}} {c}\n\
                 picket_alert_queue_wait_seconds_sum 3.5\n"
            )
        };
        let before = buckets(&text(5, 5, 5), "picket_alert_queue_wait_seconds_bucket");
        assert_eq!(before.len(), 3);
        // The run adds 60 under 0.1 s, 39 up to 1 s and one beyond.
        let after = buckets(
            &text(65, 104, 105),
            "picket_alert_queue_wait_seconds_bucket",
        );
        assert_eq!(bucket_quantiles(&before, &after), Some((0.1, 1.0)));
        assert_eq!(bucket_quantiles(&after, &after), None);
    }

    #[test]
    fn storm_mix_follows_its_percentages() {
        let s = shape(StormKind::CredentialStuffing, 10);
        let failed = s.failed_logins() as f64;
        // 25 % logins × 10 % failing of 100,000 events ≈ 2,500.
        assert!((2_300.0..2_700.0).contains(&failed), "{failed}");
        let b = s.batch(3);
        assert_eq!(b.len(), 1000);
        assert_eq!(b[0].idempotency_key, "t-3000");
        let proxies = b
            .iter()
            .filter(|e| e.outcome == pb::Outcome::Failure as i32 && e.event_type == "user.login")
            .all(|e| e.source_ip.starts_with("172.16."));
        assert!(proxies);
    }

    #[test]
    fn fresh_ips_never_repeat_an_address() {
        let s = shape(StormKind::FreshIps, 20);
        let ips: HashSet<String> = (0..s.batches())
            .flat_map(|b| s.batch(b))
            .map(|e| e.source_ip)
            .collect();
        assert_eq!(ips.len(), 100_000);
    }
}
