//! `picket bench shards`: detection throughput with detection shared over
//! replicas. It creates T tenants on a Postgres database (through a server
//! with detection off, so the replicas know every tenant from their first
//! rebuild), starts R `picket serve` child processes with detection on (the
//! default 64 shards), waits until they have shared the shards out, and then
//! ingests E generated events per tenant (the `bench ingest` mix) as fast as
//! C concurrent callers can, each tenant's events through replica
//! `tenant % R`. Detection is done when the replicas' counts of evaluated
//! events (`picket_detect_events_total`, each from its own `/metrics`) add up
//! to every event sent; the rate is events over the time from the first send
//! to then. The ingest rate (first send to last ack) is reported beside it,
//! since detection cannot go faster than events arrive. With `--redis-url`
//! the replicas wake each other (as in production); without it, a replica
//! hears of events ingested through another by its 2 s poll.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::client::serve_child::{ServerChild, http_get, metric_sum};
use crate::cli::client::{tenant_with_key, with_key};
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;

/// `picket bench shards` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchShardsArgs {
    /// Postgres database the replicas share (fresh tenants are created in it;
    /// use an empty database: the replicas evaluate every tenant in it).
    #[arg(long, env = "PICKET_BENCH_DATABASE_URL")]
    pub database_url: String,
    /// Replicas running detection.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Tenants.
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// Events per tenant.
    #[arg(long, default_value_t = 2000)]
    pub events_per_tenant: usize,
    /// Events per `Ingest` call.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Concurrent `Ingest` callers.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Redis for the replicas' wake-up signals (without it a replica hears of
    /// events ingested through another by its 2 s poll).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Give up waiting for detection this long after the last ack.
    #[arg(long, default_value_t = 300)]
    pub timeout_seconds: u64,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct ShardsReport {
    /// Replicas running detection.
    pub replicas: usize,
    /// Detection shards each led when the load started.
    pub shards_led: Vec<u64>,
    /// Tenants.
    pub tenants: usize,
    /// Events sent.
    pub events: usize,
    /// Events the replicas evaluated, counted once detection was done (more
    /// than `events` would mean an event evaluated twice).
    pub events_evaluated: f64,
    /// First send → last ack, seconds.
    pub ingest_seconds: f64,
    /// Events acknowledged per second.
    pub ingest_events_per_sec: f64,
    /// First send → every event evaluated, seconds.
    pub detect_seconds: f64,
    /// Events evaluated per second over that time.
    pub detect_events_per_sec: f64,
    /// Last ack → every event evaluated, seconds (how far detection trailed).
    pub drain_seconds: f64,
    /// Alerts raised or folded by all replicas.
    pub alerts_raised: f64,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchShardsArgs) -> anyhow::Result<()> {
    let r = bench(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "replicas           {} (shards led: {:?})",
        r.replicas, r.shards_led
    );
    println!(
        "load               {} events over {} tenants ({} evaluated)",
        r.events, r.tenants, r.events_evaluated
    );
    println!(
        "ingest             {:.0} events/s ({:.1} s)",
        r.ingest_events_per_sec, r.ingest_seconds
    );
    println!(
        "detection          {:.0} events/s ({:.1} s from the first send, {:.1} s after the last ack)",
        r.detect_events_per_sec, r.detect_seconds, r.drain_seconds
    );
    println!("alerts             {:.0} raised or folded", r.alerts_raised);
    Ok(())
}

/// Runs the benchmark.
pub async fn bench(args: &BenchShardsArgs) -> anyhow::Result<ShardsReport> {
    anyhow::ensure!(
        crate::storage::Backend::from_url(&args.database_url)
            == Some(crate::storage::Backend::Postgres),
        "--database-url must be a Postgres database (replicas share it)"
    );
    anyhow::ensure!(
        (1..=16).contains(&args.replicas),
        "--replicas must be 1..16"
    );
    anyhow::ensure!(
        (1..=10_000).contains(&args.tenants),
        "--tenants must be 1..10000"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.events_per_tenant),
        "--events-per-tenant must be 1..1000000"
    );
    anyhow::ensure!(
        (1..=10_000).contains(&args.batch_size),
        "--batch-size must be 1..10000"
    );
    anyhow::ensure!(
        (1..=256).contains(&args.concurrency),
        "--concurrency must be 1..256"
    );
    let operator = crate::access::auth::random_secret();
    let run = hex::encode(rand::random::<[u8; 4]>());

    // Tenants first, through a server that runs no detection.
    let keys = {
        let setup = ServerChild::start(
            &args.database_url,
            &operator,
            &[("PICKET_DETECTION".into(), "false".into())],
        )?;
        let mut admin = AdminServiceClient::new(connect(&setup.addr).await?);
        let mut keys = Vec::with_capacity(args.tenants);
        for i in 0..args.tenants {
            let (_, key) = tenant_with_key(
                &mut admin,
                &operator,
                format!("bench-shards-{run}-{i}"),
                "bench-shards",
                &[pb::Scope::Ingest, pb::Scope::Read],
            )
            .await?;
            keys.push(key);
        }
        keys
    };

    let mut replicas = Vec::with_capacity(args.replicas);
    let env: Vec<(String, String)> = args
        .redis_url
        .as_deref()
        .map(|url| ("PICKET_REDIS_URL".to_owned(), url.to_owned()))
        .into_iter()
        .collect();
    for _ in 0..args.replicas {
        replicas.push(ServerChild::start(&args.database_url, &operator, &env)?);
    }
    let shards_led = wait_spread(&replicas).await?;
    let mut channels = Vec::with_capacity(args.replicas);
    for r in &replicas {
        channels.push(connect(&r.addr).await?);
    }
    let before = sum_counter(&replicas, "picket_detect_events_total").await?;
    let alerts_before = sum_counter(&replicas, "picket_alerts_raised_total").await?;

    // Every tenant's events, generated before the clock starts.
    let work: Vec<(usize, Vec<pb::Event>)> = (0..args.tenants)
        .map(|i| {
            let events = crate::cli::client::bench::generate(
                args.events_per_tenant,
                &format!("{run}-{i}"),
                i as u64,
            );
            (i, events)
        })
        .collect();
    let total = args.tenants * args.events_per_tenant;
    let work = Arc::new(std::sync::Mutex::new(work));
    let keys = Arc::new(keys);
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..args.concurrency {
        let (work, keys, channels, sent) =
            (work.clone(), keys.clone(), channels.clone(), sent.clone());
        let batch = args.batch_size;
        callers.push(tokio::spawn(async move {
            loop {
                let next = work.lock().expect("not poisoned").pop();
                let Some((i, events)) = next else {
                    return Ok::<_, anyhow::Error>(());
                };
                let mut client = IngestServiceClient::new(channels[i % channels.len()].clone())
                    .max_encoding_message_size(64 << 20);
                for chunk in events.chunks(batch) {
                    let reply = client
                        .ingest(with_key(
                            pb::IngestRequest {
                                events: chunk.to_vec(),
                            },
                            &keys[i],
                        )?)
                        .await
                        .map_err(|s| {
                            anyhow::anyhow!("ingest failed: {} ({:?})", s.message(), s.code())
                        })?
                        .into_inner();
                    anyhow::ensure!(
                        reply.accepted as usize == chunk.len(),
                        "{} of {} events accepted",
                        reply.accepted,
                        chunk.len()
                    );
                    sent.fetch_add(chunk.len(), Ordering::Relaxed);
                }
            }
        }));
    }
    for c in callers {
        c.await.context("an ingest caller panicked")??;
    }
    let ingested = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    let (detected, events_evaluated) = loop {
        let evaluated = sum_counter(&replicas, "picket_detect_events_total").await? - before;
        if evaluated >= total as f64 {
            break (started.elapsed(), evaluated);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "detection evaluated {evaluated} of {total} events within {} s of the last ack",
            args.timeout_seconds
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let alerts_raised = sum_counter(&replicas, "picket_alerts_raised_total").await? - alerts_before;
    Ok(ShardsReport {
        replicas: args.replicas,
        shards_led,
        tenants: args.tenants,
        events: total,
        events_evaluated,
        ingest_seconds: ingested.as_secs_f64(),
        ingest_events_per_sec: total as f64 / ingested.as_secs_f64(),
        detect_seconds: detected.as_secs_f64(),
        detect_events_per_sec: total as f64 / detected.as_secs_f64(),
        drain_seconds: (detected - ingested).as_secs_f64(),
        alerts_raised,
    })
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?,
    )
}

/// Waits (at most 60 s) until the replicas lead every shard between them,
/// none idle; returns how many each leads.
async fn wait_spread(replicas: &[ServerChild]) -> anyhow::Result<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut led = Vec::with_capacity(replicas.len());
        for r in replicas {
            let body = http_get(&r.addr, "/healthz").await?;
            let health: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            led.push(health["detect_shards"].as_u64().unwrap_or(0));
        }
        let share = crate::pipeline::shards::fair_share(
            crate::pipeline::shards::DEFAULT_SHARDS,
            replicas.len() as u32,
        ) as u64;
        if led.iter().sum::<u64>() == u64::from(crate::pipeline::shards::DEFAULT_SHARDS)
            && led.iter().all(|n| (1..=share).contains(n))
        {
            return Ok(led);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the replicas never shared the shards out: {led:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum over the replicas of every series of counter `name`.
async fn sum_counter(replicas: &[ServerChild], name: &str) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for r in replicas {
        let text = http_get(&r.addr, "/metrics").await?;
        sum += metric_sum(&text, name);
    }
    Ok(sum)
}
