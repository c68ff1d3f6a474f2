//! `picket bench sdk`: the Rust SDK (`sdk/rust`, crate `picket-client`).
//!
//! 1. **Client throughput.** It starts a server over the given database in
//!    this process (port 0), creates a tenant, and enqueues N realistic
//!    events (the `bench ingest` generator) into one `TelemetryClient`
//!    back to back, then `close()`s it: events/s from the first enqueue until
//!    every receipt is in (every event ACCEPTED, none dropped), and the
//!    caller's cost per `enqueue_event`. The **reference** in the same run:
//!    the same events, encoded beforehand, sent by back-to-back `Ingest`
//!    calls of the same batch size on one connection (one call at a time,
//!    as the SDK's sender does). The server's detection pipeline is off,
//!    as in `bench ingest`.
//! 2. **Decision cache.** A detached `DecisionCache` loaded with 100,000
//!    banned addresses and 10,000 banned ranges (IPv4 /16–/30, IPv6
//!    /48–/64, a few allow ranges above bans): the resident memory it adds,
//!    then `check(ip)` latency p50/p99 over a mix of banned addresses,
//!    addresses inside banned ranges and misses, each answer checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use prost::Message;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use serde::Serialize;

use crate::cli::client::tenant_with_key;
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::server::config::Settings;
use crate::server::startup::Application;
use crate::storage::DEFAULT_DATABASE_URL;
use picket_client::pb as sdk_pb;

/// `picket bench sdk` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchSdkArgs {
    /// Database to run on; a fresh tenant is created in it.
    #[arg(long, env = "PICKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Events to send through the client.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// The client's `max_batch_size` (and the reference's batch size).
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Banned addresses in the decision cache.
    #[arg(long, default_value_t = 100_000)]
    pub ips: usize,
    /// Banned ranges in the decision cache.
    #[arg(long, default_value_t = 10_000)]
    pub cidrs: usize,
    /// `check` calls to time.
    #[arg(long, default_value_t = 1_000_000)]
    pub checks: usize,
    /// Skip the client throughput part (no server).
    #[arg(long)]
    pub skip_client: bool,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What the client part measured.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Events sent.
    pub events: usize,
    /// The client's batch size.
    pub batch_size: usize,
    /// Events/s through the SDK, first enqueue to last receipt.
    pub client_events_per_sec: f64,
    /// Events/s of back-to-back pre-encoded Ingest calls.
    pub reference_events_per_sec: f64,
    /// client / reference.
    pub ratio: f64,
    /// Mean cost of one `enqueue_event`, in microseconds.
    pub enqueue_us: f64,
}

/// What the cache part measured.
#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    /// Banned addresses loaded.
    pub ips: usize,
    /// Banned ranges loaded.
    pub cidrs: usize,
    /// Resident memory the loaded cache added, in MiB.
    pub memory_mib: f64,
    /// Time to build it from the snapshot, in ms.
    pub load_ms: f64,
    /// `check` calls timed.
    pub checks: usize,
    /// Latency in nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
    /// 99.9th percentile, ns.
    pub p999_ns: u64,
    /// Maximum, ns.
    pub max_ns: u64,
}

/// Both parts.
#[derive(Debug, Clone, Serialize)]
pub struct SdkReport {
    /// The client part, unless skipped.
    pub client: Option<ClientReport>,
    /// The cache part.
    pub cache: CacheReport,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchSdkArgs) -> anyhow::Result<()> {
    let client = if args.skip_client {
        None
    } else {
        Some(client_part(&args).await?)
    };
    let cache = tokio::task::spawn_blocking({
        let args = args.clone();
        move || cache_part(&args)
    })
    .await
    .context("cache bench panicked")??;
    let report = SdkReport { client, cache };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if let Some(c) = &report.client {
        println!("backend            {}", c.backend);
        println!(
            "client             {} events, batches of {}: {:.0} events/s (enqueue_event {:.2} µs)",
            c.events, c.batch_size, c.client_events_per_sec, c.enqueue_us
        );
        println!(
            "reference          {:.0} events/s (pre-encoded Ingest calls back to back); ratio {:.2}",
            c.reference_events_per_sec, c.ratio
        );
    }
    let c = &report.cache;
    println!(
        "decision cache     {} IPs + {} CIDRs: {:.1} MiB resident, loaded in {:.0} ms",
        c.ips, c.cidrs, c.memory_mib, c.load_ms
    );
    println!(
        "check(ip)          {} calls: p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        c.checks, c.p50_ns, c.p99_ns, c.p999_ns, c.max_ns
    );
    Ok(())
}

/// The SDK's events: the `bench ingest` generator's, re-decoded as the
/// SDK's own generated type (the same wire format).
fn sdk_events(n: usize, run: &str) -> anyhow::Result<Vec<sdk_pb::Event>> {
    crate::cli::client::bench::generate(n, run, 11)
        .into_iter()
        .map(|e| Ok(sdk_pb::Event::decode(e.encode_to_vec().as_slice())?))
        .collect()
}

async fn client_part(args: &BenchSdkArgs) -> anyhow::Result<ClientReport> {
    anyhow::ensure!(
        (1..=1000).contains(&args.batch_size),
        "--batch-size must be 1..1000"
    );
    let operator = crate::access::auth::random_secret();
    let mut settings = Settings::with_database(Some(&args.database_url));
    settings.listen = "127.0.0.1:0".parse().expect("static address");
    settings.admin_token = Some(SecretString::from(operator.clone()));
    // As in `bench ingest`: detection would read the reference's events
    // behind it and compete with the SDK's half of the run.
    settings.detection = false;
    let app = Application::build(settings)
        .await
        .context("failed to start the server")?;
    let backend = app.store().backend().as_str().to_owned();
    let endpoint = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let channel =
        picket_client::transport::connect(&endpoint, &picket_client::TlsOptions::default()).await?;
    let run_id = hex::encode(rand::random::<[u8; 4]>());
    let (_, key) = tenant_with_key(
        &mut AdminServiceClient::new(channel.clone()),
        &operator,
        format!("bench-sdk-{run_id}"),
        "bench",
        &[pb::Scope::Ingest],
    )
    .await?;

    // The reference first: pre-encoded batches, one call at a time.
    let reference_events = sdk_events(args.events, &format!("{run_id}-ref"))?;
    let api_key = picket_client::ApiKey::new(&key)?;
    let mut ingest = sdk_pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    let batches: Vec<sdk_pb::IngestRequest> = reference_events
        .chunks(args.batch_size)
        .map(|c| sdk_pb::IngestRequest { events: c.to_vec() })
        .collect();
    let started = Instant::now();
    for batch in batches {
        let response = ingest.ingest(api_key.request(batch)).await?.into_inner();
        anyhow::ensure!(response.rejected == 0, "the reference had rejections");
    }
    let reference_events_per_sec = args.events as f64 / started.elapsed().as_secs_f64();

    // The SDK.
    let events = sdk_events(args.events, &run_id)?;
    let client = picket_client::TelemetryClient::new(picket_client::ClientConfig {
        max_batch_size: args.batch_size,
        max_queue_size: args.events,
        shutdown_timeout: Duration::from_secs(600),
        ..picket_client::ClientConfig::new(key, endpoint)
    })?;
    let started = Instant::now();
    for e in events {
        client.enqueue_event(e);
    }
    let enqueue_us = started.elapsed().as_secs_f64() * 1e6 / args.events as f64;
    let stats = client.close().await;
    let client_events_per_sec = args.events as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        stats.accepted == args.events as u64 && stats.dropped.total() == 0,
        "not every event was accepted: {stats:?}"
    );
    let _ = stop.send(());
    server.await.context("server panicked")??;
    Ok(ClientReport {
        backend,
        events: args.events,
        batch_size: args.batch_size,
        client_events_per_sec,
        reference_events_per_sec,
        ratio: client_events_per_sec / reference_events_per_sec,
        enqueue_us,
    })
}

/// This process's resident memory in bytes (0 where /proc is absent).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn effective(
    scope: sdk_pb::DecisionScope,
    value: String,
    ban: bool,
    expires: i64,
    n: usize,
) -> sdk_pb::EffectiveDecision {
    sdk_pb::EffectiveDecision {
        scope: scope as i32,
        value,
        r#type: if ban {
            sdk_pb::DecisionType::Ban
        } else {
            sdk_pb::DecisionType::Allow
        } as i32,
        expires_at: Some(prost_types::Timestamp {
            seconds: expires,
            nanos: 0,
        }),
        decision_id: uuid::Uuid::from_u128(n as u128 + 1).to_string(),
        reason: "bench".into(),
        ..Default::default()
    }
}

fn cache_part(args: &BenchSdkArgs) -> anyhow::Result<CacheReport> {
    use sdk_pb::DecisionScope::{Cidr, Ip};
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let expires = chrono::Utc::now().timestamp() + 3600;
    // The banned addresses: 90 % IPv4 in 100.64.0.0/10, 10 % IPv6.
    let ips: Vec<IpAddr> = (0..args.ips)
        .map(|i| {
            if i % 10 == 9 {
                IpAddr::V6(Ipv6Addr::from(
                    (0x2001_0db8u128 << 96) | u128::from(rng.random::<u64>()),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(
                    0x6440_0000 | (rng.random::<u32>() & 0x003f_ffff),
                ))
            }
        })
        .collect();
    // Ranges: IPv4 /16../30 in 10.0.0.0/8 and 172.16.0.0/12, 10 % IPv6
    // /48../64, every 100th an allow with a ban inside it.
    let mut ranges: Vec<(String, bool, IpAddr)> = Vec::with_capacity(args.cidrs);
    for i in 0..args.cidrs {
        if i % 10 == 9 {
            let len = rng.random_range(48..=64u8);
            let net = ipnet::Ipv6Net::new(
                Ipv6Addr::from((0x2001_0db9u128 << 96) | (u128::from(rng.random::<u64>()) << 32)),
                len,
            )?
            .trunc();
            ranges.push((net.to_string(), true, IpAddr::V6(net.network())));
        } else {
            let len = rng.random_range(16..=30u8);
            let base = if i % 2 == 0 { 0x0a00_0000 } else { 0xac10_0000 };
            let mask = if i % 2 == 0 { 0x00ff_ffff } else { 0x000f_ffff };
            let net =
                ipnet::Ipv4Net::new(Ipv4Addr::from(base | (rng.random::<u32>() & mask)), len)?
                    .trunc();
            ranges.push((net.to_string(), i % 100 != 0, IpAddr::V4(net.network())));
        }
    }
    let cache = picket_client::DecisionCache::detached();
    let before = rss_bytes();
    let started = Instant::now();
    let snapshot =
        ips.iter()
            .enumerate()
            .map(|(n, ip)| effective(Ip, ip.to_string(), true, expires, n))
            .chain(ranges.iter().enumerate().map(|(n, (net, ban, _))| {
                effective(Cidr, net.clone(), *ban, expires, args.ips + n)
            }));
    cache.apply_snapshot(snapshot, 1);
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let memory = rss_bytes().saturating_sub(before);
    anyhow::ensure!(
        cache.len() >= args.ips.min(1) && cache.len() <= args.ips + args.cidrs,
        "the cache holds {} targets",
        cache.len()
    );

    // The lookups: a third banned addresses, a third inside ranges, a third misses.
    let probes: Vec<IpAddr> = (0..args.checks.min(1_000_000))
        .map(|i| match i % 3 {
            0 => ips[rng.random_range(0..ips.len().max(1))],
            1 => ranges[rng.random_range(0..ranges.len().max(1))].2,
            _ => IpAddr::V4(Ipv4Addr::from(
                0xc000_0000 | (rng.random::<u32>() & 0x0fff_ffff),
            )),
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds");
    let mut denied = 0usize;
    for i in 0..args.checks {
        let ip = probes[i % probes.len()];
        let t = Instant::now();
        let verdict = cache.check(ip);
        let ns = t.elapsed().as_nanos() as u64;
        hist.record(ns.max(1)).ok();
        denied += usize::from(!verdict.allowed);
    }
    anyhow::ensure!(
        denied > 0,
        "no check was denied: the cache is not answering"
    );
    Ok(CacheReport {
        ips: args.ips,
        cidrs: args.cidrs,
        memory_mib: memory as f64 / (1024.0 * 1024.0),
        load_ms,
        checks: args.checks,
        p50_ns: hist.value_at_quantile(0.5),
        p99_ns: hist.value_at_quantile(0.99),
        p999_ns: hist.value_at_quantile(0.999),
        max_ns: hist.max(),
    })
}
