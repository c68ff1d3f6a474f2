//! `picket bench ingest`: a rerunnable load generator. It starts a server over
//! the given database in this process (port 0), creates a fresh tenant, drives
//! `IngestStream` from N concurrent clients (own connection each) with a window
//! of batches in flight, and reports events/s and ack latency (send → ack).
//! In the same run it measures the raw ceiling: the same generated events
//! written straight into the same table by the fastest plain SQL path
//! (`storage::ceiling`), and prints the ratio.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cli::client::{tenant_with_key, with_key};
use crate::domain::TenantId;
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;
use crate::server::config::Settings;
use crate::server::startup::Application;
use crate::storage::DEFAULT_DATABASE_URL;

/// `picket bench ingest` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchIngestArgs {
    /// Database to run on; a fresh tenant is created in it.
    #[arg(long, env = "PICKET_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Events to send.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Concurrent clients, each with its own connection and stream.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Batches in flight per client.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Send at this steady total rate (events/s) instead of as fast as possible.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Parallel connections for the raw COPY ceiling (Postgres).
    #[arg(long, default_value_t = 2)]
    pub raw_writers: usize,
    /// Skip the raw ceiling.
    #[arg(long)]
    pub skip_raw: bool,
    /// Server ingest writer tasks.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Also run the detection pipeline in the server during the run (off by
    /// default: it competes for the same database and CPU).
    #[arg(long)]
    pub with_detection: bool,
    /// Fold the report rollups in the server during the run, every this
    /// many milliseconds, as `picket serve` does by default (1000); 0 turns
    /// them off, to measure what they cost.
    #[arg(long, default_value_t = 1000)]
    pub rollup_interval_ms: u64,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// Events sent.
    pub events: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Events per batch.
    pub batch_size: usize,
    /// Batches in flight per client.
    pub in_flight: usize,
    /// Target rate, if paced.
    pub rate: Option<u64>,
    /// Events acknowledged per second (wall time of the whole run).
    pub ingest_events_per_sec: f64,
    /// Ack latency percentiles in milliseconds.
    pub ack_latency_ms: Latency,
    /// Raw ceiling rows per second, if measured.
    pub raw_rows_per_sec: Option<f64>,
    /// ingest / raw.
    pub ratio_to_raw: Option<f64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// Deterministic, realistic events: mostly HTTP requests, logins with some
/// failures, API calls and a few VPN and database events.
pub fn generate(n: usize, run: &str, seed: u64) -> Vec<pb::Event> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let now = Utc::now();
    let paths = [
        "/api/v1/orders",
        "/api/v1/users/42",
        "/login",
        "/api/v1/reports",
        "/static/app.js",
        "/admin/settings",
    ];
    let services = ["checkout", "accounts", "billing", "web"];
    (0..n)
        .map(|i| {
            let actor = format!("user{}@example.com", rng.random_range(0..500));
            let ip = format!(
                "10.{}.{}.{}",
                rng.random_range(0..4),
                rng.random_range(0..255),
                rng.random_range(1..255)
            );
            let occurred = now - chrono::Duration::milliseconds(rng.random_range(0..3_600_000));
            let mut e = pb::Event {
                occurred_at: Some(crate::grpc::convert::timestamp(occurred)),
                idempotency_key: format!("{run}-{i}"),
                actor,
                source_ip: ip,
                source_system: "picket-bench".into(),
                service: services[rng.random_range(0..services.len())].into(),
                environment: "production".into(),
                ..Default::default()
            };
            match rng.random_range(0..100) {
                0..70 => {
                    let path = paths[rng.random_range(0..paths.len())];
                    let status = [200, 200, 200, 201, 204, 304, 400, 401, 403, 404, 500]
                        [rng.random_range(0..11)];
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
                        latency_ms: rng.random_range(1.0..400.0),
                        bytes_in: rng.random_range(0..2000),
                        bytes_out: rng.random_range(100..200_000),
                        user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36".into(),
                        route: path.into(),
                    });
                }
                70..88 => {
                    let ok = rng.random_range(0..10) > 1;
                    e.event_type = "user.login".into();
                    e.action = "login".into();
                    e.resource = "/login".into();
                    e.outcome = if ok {
                        pb::Outcome::Success
                    } else {
                        pb::Outcome::Failure
                    } as i32;
                    e.auth = Some(pb::AuthDetails {
                        method: "password".into(),
                        mfa_used: ok,
                        failure_reason: if ok {
                            String::new()
                        } else {
                            "bad_password".into()
                        },
                        ..Default::default()
                    });
                }
                88..96 => {
                    e.event_type = "api.call".into();
                    e.action = "invoke".into();
                    e.resource = "orders.list".into();
                    e.outcome = pb::Outcome::Success as i32;
                }
                96..98 => {
                    e.event_type = "vpn.connect".into();
                    e.action = "connect".into();
                    e.resource = "vpn-gw-1".into();
                    e.network = Some(pb::NetworkDetails {
                        destination_port: 443,
                        protocol: "udp".into(),
                        device: "gw1".into(),
                        ..Default::default()
                    });
                }
                _ => {
                    e.event_type = "db.connect".into();
                    e.action = "connect".into();
                    e.resource = "orders-db".into();
                    e.database = Some(pb::DatabaseDetails {
                        system: "postgres".into(),
                        database: "orders".into(),
                        db_user: "app".into(),
                        ..Default::default()
                    });
                }
            }
            e.attributes = HashMap::from([("region".to_string(), "eu-west-1".to_string())]);
            e
        })
        .collect()
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchIngestArgs) -> anyhow::Result<()> {
    let report = bench(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("backend            {}", report.backend);
        println!(
            "load               {} events, {} clients, batches of {}, {} in flight per client{}",
            report.events,
            report.clients,
            report.batch_size,
            report.in_flight,
            report
                .rate
                .map(|r| format!(", paced at {r} events/s"))
                .unwrap_or_default()
        );
        println!(
            "ingest             {:.0} events/s",
            report.ingest_events_per_sec
        );
        println!(
            "ack latency        p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            report.ack_latency_ms.p50, report.ack_latency_ms.p99, report.ack_latency_ms.max
        );
        if let (Some(raw), Some(ratio)) = (report.raw_rows_per_sec, report.ratio_to_raw) {
            println!("raw ceiling        {raw:.0} rows/s");
            println!("ingest / raw       {ratio:.2}");
        }
    }
    Ok(())
}

/// Runs the benchmark.
pub async fn bench(args: &BenchIngestArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        (1..=1000).contains(&args.batch_size),
        "--batch-size must be 1..1000"
    );
    anyhow::ensure!(
        args.clients >= 1 && args.in_flight >= 1,
        "--clients and --in-flight must be at least 1"
    );
    let operator = crate::access::auth::random_secret();
    let mut settings = Settings::with_database(Some(&args.database_url));
    settings.listen = "127.0.0.1:0".parse().expect("static address");
    settings.admin_token = Some(SecretString::from(operator.clone()));
    settings.ingest_writers = args.writers;
    settings.detection = args.with_detection;
    settings.rollup_interval_ms = args.rollup_interval_ms;
    let app = Application::build(settings)
        .await
        .context("failed to start the server")?;
    let backend = app.store().backend().as_str().to_owned();
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let endpoint = format!("http://{addr}");
    let channel =
        picket_client::transport::connect(&endpoint, &picket_client::TlsOptions::default()).await?;
    let run_id = hex::encode(rand::random::<[u8; 4]>());
    let mut admin = AdminServiceClient::new(channel);
    let (_, key) = tenant_with_key(
        &mut admin,
        &operator,
        format!("bench-{run_id}"),
        "bench",
        &[pb::Scope::Ingest],
    )
    .await?;

    let events = generate(args.events, &run_id, 7);

    // Raw ceiling first, for a separate tenant, on the same table.
    let raw_rows_per_sec = if args.skip_raw {
        None
    } else {
        let raw_tenant = admin
            .create_tenant(with_key(
                pb::CreateTenantRequest {
                    name: format!("bench-raw-{run_id}"),
                    ..Default::default()
                },
                &operator,
            )?)
            .await?
            .into_inner()
            .tenant
            .context("no tenant")?;
        let raw_tenant = TenantId::parse(&raw_tenant.id, "tenant")
            .map_err(|v| anyhow::anyhow!(v.description))?;
        let now = Utc::now();
        let domain: Vec<_> = events
            .iter()
            .map(|e| {
                crate::grpc::events::event_from_pb(e, now, 0)
                    .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.description))
            })
            .collect::<anyhow::Result<_>>()?;
        let took = crate::storage::ceiling::write_raw(
            &args.database_url,
            raw_tenant,
            &domain,
            args.raw_writers,
        )
        .await?;
        Some(domain.len() as f64 / took.as_secs_f64())
    };

    // Ingest through the server.
    let per_client = events.len().div_ceil(args.clients);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for (c, part) in events.chunks(per_client.max(1)).enumerate() {
        let part = part.to_vec();
        let key = key.clone();
        let endpoint = endpoint.clone();
        let batch_size = args.batch_size;
        let in_flight = args.in_flight;
        let pace = args.rate.map(|r| {
            let per_client_rate = (r as f64 / args.clients as f64).max(1.0);
            Duration::from_secs_f64(batch_size as f64 / per_client_rate)
        });
        tasks.push(tokio::spawn(async move {
            client_run(c, endpoint, key, part, batch_size, in_flight, pace).await
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
    for t in tasks {
        let h = t.await.context("client panicked")??;
        hist.add(h).expect("same bounds");
    }
    let wall = started.elapsed().as_secs_f64();
    let ingest_events_per_sec = events.len() as f64 / wall;
    let _ = stop.send(());
    server.await.context("server panicked")??;
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(BenchReport {
        backend,
        events: events.len(),
        clients: args.clients,
        batch_size: args.batch_size,
        in_flight: args.in_flight,
        rate: args.rate,
        ingest_events_per_sec,
        ack_latency_ms: Latency {
            p50: ms(hist.value_at_quantile(0.5)),
            p99: ms(hist.value_at_quantile(0.99)),
            max: ms(hist.max()),
        },
        raw_rows_per_sec,
        ratio_to_raw: raw_rows_per_sec.map(|raw| ingest_events_per_sec / raw),
    })
}

/// One client: its own connection and one stream; returns ack latencies
/// (send → ack) in µs.
async fn client_run(
    id: usize,
    endpoint: String,
    key: String,
    events: Vec<pb::Event>,
    batch_size: usize,
    in_flight: usize,
    pace: Option<Duration>,
) -> anyhow::Result<Histogram<u64>> {
    let channel =
        picket_client::transport::connect(&endpoint, &picket_client::TlsOptions::default()).await?;
    let batches: Vec<Vec<pb::Event>> = events.chunks(batch_size).map(|c| c.to_vec()).collect();
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight));
    Ok(
        stream_batches(id, channel, &key, batches.into_iter(), window, pace, None)
            .await?
            .latencies,
    )
}

/// What [`stream_batches`] measured.
pub(crate) struct StreamRun {
    /// Ack latencies (send → ack) in µs.
    pub latencies: Histogram<u64>,
    /// When the last ack arrived.
    pub last_ack: Option<Instant>,
}

/// Sends `batches` on one `IngestStream` over `channel` with `key`: a paced
/// sender and a concurrent ack reader, each batch holding a permit of
/// `window` (shared by several streams when the caller wants one window
/// across them) until it is acknowledged. Every event must be accepted.
/// `acked`, if given, counts acknowledged events as they arrive.
pub(crate) async fn stream_batches<I>(
    id: usize,
    channel: tonic::transport::Channel,
    key: &str,
    batches: I,
    window: std::sync::Arc<tokio::sync::Semaphore>,
    pace: Option<Duration>,
    acked: Option<std::sync::Arc<tokio::sync::watch::Sender<usize>>>,
) -> anyhow::Result<StreamRun>
where
    I: ExactSizeIterator<Item = Vec<pb::Event>> + Send + 'static,
{
    use std::sync::{Arc, Mutex};
    let mut client = IngestServiceClient::new(channel).max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<pb::IngestStreamRequest>(4);
    let mut acks = client
        .ingest_stream(with_key(ReceiverStream::new(rx), key)?)
        .await?
        .into_inner();
    // (send instant, events) per sequence number.
    let sent_at: Arc<Mutex<HashMap<u64, (Instant, usize)>>> = Arc::default();
    let total = batches.len();
    let sender = {
        let window = window.clone();
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut ticker = pace.map(|p| {
                let mut i = tokio::time::interval(p);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            for (n, batch) in batches.enumerate() {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let permit = window.acquire().await.expect("window open");
                permit.forget();
                let seq = n as u64 + 1;
                sent_at
                    .lock()
                    .expect("not poisoned")
                    .insert(seq, (Instant::now(), batch.len()));
                if tx
                    .send(pb::IngestStreamRequest {
                        sequence: seq,
                        events: batch,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
    let mut last_ack = None;
    for _ in 0..total {
        let ack = acks
            .message()
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "client {id}: stream failed: {} ({:?})",
                    s.message(),
                    s.code()
                )
            })?
            .with_context(|| format!("client {id}: stream ended early"))?;
        anyhow::ensure!(
            ack.rejected == 0,
            "client {id}: {} events rejected",
            ack.rejected
        );
        let now = Instant::now();
        last_ack = Some(now);
        if let Some((t, n)) = sent_at.lock().expect("not poisoned").remove(&ack.sequence) {
            latencies
                .record(now.duration_since(t).as_micros().max(1) as u64)
                .ok();
            if let Some(acked) = &acked {
                acked.send_modify(|a| *a += n);
            }
        }
        window.add_permits(1);
    }
    sender.await.context("sender panicked")?;
    Ok(StreamRun {
        latencies,
        last_ack,
    })
}

/// Nearest-rank p50, p99 and max in milliseconds; `None` when empty.
pub(crate) fn percentiles(d: &[Duration]) -> Option<Latency> {
    if d.is_empty() {
        return None;
    }
    let mut ms: Vec<f64> = d.iter().map(|x| x.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Some(Latency {
        p50: rank(0.5),
        p99: rank(0.99),
        max: ms[ms.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = percentiles(&d).unwrap();
        assert_eq!((l.p50, l.p99, l.max), (50.0, 99.0, 100.0));
        assert!(percentiles(&[]).is_none());
    }
}
