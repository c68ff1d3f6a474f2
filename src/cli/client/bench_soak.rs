//! `picket bench soak`: a server under steady load for a long time. It
//! starts `picket serve` (detection on) as a child process over a fresh
//! Postgres database, measures the server's ingest capacity first (clients
//! sending back to back for `--calibrate-seconds`), then for `--duration`
//! ingests at half of it (or `--rate`) with 100 WatchAlerts / WatchIncidents
//! subscribers and 5 TailEvents streams connected and a failed-login burst
//! from a fresh address every `--burst-every-seconds`. Every minute it
//! records events accepted, errors by code, ack latency, detection lag (the
//! server's `/healthz`), subscriber delivery lag, and the server's RSS and
//! open file descriptors; at the end it checks the pass criteria of issue 16
//! §5 (no errors, every burst alerted, the last minute's p99 ack latency
//! within 1.5 × the first's, RSS slope under 1 MiB/minute after warm-up and
//! RSS under 300 MB).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::cli::client::serve_child::{ServerChild, http_get};
use crate::cli::client::{tenant_with_key, with_key};
use crate::grpc::pb;
use crate::grpc::pb::alert_service_client::AlertServiceClient;
use crate::grpc::pb::incident_service_client::IncidentServiceClient;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;

/// `picket bench soak` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchSoakArgs {
    /// A Postgres URL of the cluster to use (a fresh database is created
    /// through it and dropped afterwards).
    #[arg(long, env = "PICKET_BENCH_DATABASE_URL")]
    pub database_url: String,
    /// How long the steady load runs, in seconds. The RSS slope is measured
    /// after `--warmup-minutes`, so a run shorter than about three times that
    /// says little about it.
    #[arg(long, default_value_t = 1800)]
    pub duration_seconds: u64,
    /// Minutes left out of the RSS slope (at most a third of the run): the
    /// detection state fills over the first two 5-minute anomaly windows
    /// (per-address windows up to their cap, the first models trained), and
    /// RSS rises with it before it levels.
    #[arg(long, default_value_t = 10)]
    pub warmup_minutes: u64,
    /// Seconds of back-to-back ingest that measure the server's capacity.
    #[arg(long, default_value_t = 20)]
    pub calibrate_seconds: u64,
    /// Events per second during the soak (default: half the measured capacity).
    #[arg(long)]
    pub rate: Option<u64>,
    /// WatchAlerts plus WatchIncidents subscribers (half each).
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// TailEvents streams.
    #[arg(long, default_value_t = 5)]
    pub tails: usize,
    /// Ingest clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Events per Ingest call.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// A failed-login burst from a fresh address this often.
    #[arg(long, default_value_t = 10)]
    pub burst_every_seconds: u64,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One minute of the soak.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Minute {
    /// Minute number, from 1.
    pub minute: usize,
    /// Events acknowledged as stored.
    pub accepted: u64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Ack latency (send of a batch → its response), ms.
    pub ack_p50_ms: f64,
    /// Ack latency p99, ms.
    pub ack_p99_ms: f64,
    /// Detection lag at the end of the minute (`/healthz`), s.
    pub detect_lag_s: Option<f64>,
    /// Subscriber delivery lag p99 (alert created or event received → on
    /// the stream), ms.
    pub delivery_p99_ms: f64,
    /// Server RSS at the end of the minute, MiB.
    pub rss_mib: f64,
    /// Server open file descriptors at the end of the minute.
    pub fds: u64,
}

/// The soak's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Capacity measured before the soak, events/s.
    pub capacity_events_per_sec: f64,
    /// Target rate of the soak, events/s.
    pub rate_events_per_sec: u64,
    /// Per minute.
    pub minutes: Vec<Minute>,
    /// Bursts sent.
    pub bursts: usize,
    /// Bursts whose alert reached a subscriber.
    pub bursts_alerted: usize,
    /// Burst ack → alert on a subscriber, p99, ms.
    pub burst_alert_p99_ms: f64,
    /// Minutes left out of the RSS slope.
    pub warmup_minutes: usize,
    /// RSS slope after the warm-up, MiB per minute (least squares over the
    /// per-minute samples).
    pub rss_slope_mib_per_min: f64,
    /// Highest RSS sampled, MiB.
    pub rss_max_mib: f64,
    /// Every pass criterion held.
    pub passed: bool,
    /// The criteria that did not hold.
    pub failed: Vec<String>,
}

/// What the load and the subscribers record, per minute index.
#[derive(Default)]
struct Record {
    accepted: HashMap<usize, u64>,
    errors: HashMap<usize, BTreeMap<String, u64>>,
    acks: HashMap<usize, Vec<f64>>,
    deliveries: HashMap<usize, Vec<f64>>,
    /// Burst address → when its events were acknowledged.
    bursts: HashMap<String, Instant>,
    /// Burst address → when its first alert reached a subscriber.
    alerted: HashMap<String, Instant>,
}

/// Runs the soak and prints the report.
pub async fn run(args: BenchSoakArgs) -> anyhow::Result<()> {
    let r = bench(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "capacity {:.0} events/s, soak at {} events/s",
        r.capacity_events_per_sec, r.rate_events_per_sec
    );
    for m in &r.minutes {
        println!(
            "min {:>3}  accepted {:>8}  errors {:?}  ack p50 {:>7.1} ms p99 {:>7.1} ms  detect lag {:>6}  delivery p99 {:>7.1} ms  RSS {:>6.1} MiB  fds {}",
            m.minute,
            m.accepted,
            m.errors,
            m.ack_p50_ms,
            m.ack_p99_ms,
            m.detect_lag_s
                .map_or_else(|| "-".to_owned(), |l| format!("{l:.1} s")),
            m.delivery_p99_ms,
            m.rss_mib,
            m.fds
        );
    }
    println!(
        "bursts {} alerted {} (p99 {:.0} ms); RSS slope {:.2} MiB/min, max {:.1} MiB; {}",
        r.bursts,
        r.bursts_alerted,
        r.burst_alert_p99_ms,
        r.rss_slope_mib_per_min,
        r.rss_max_mib,
        if r.passed {
            "PASSED".to_owned()
        } else {
            format!("FAILED: {}", r.failed.join("; "))
        }
    );
    Ok(())
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms_since(t: Option<prost_types::Timestamp>) -> Option<f64> {
    let t = t?;
    let at = chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)?;
    Some(((Utc::now() - at).num_microseconds()? as f64 / 1000.0).max(0.0))
}

/// The soak itself.
pub async fn bench(args: &BenchSoakArgs) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(
        args.database_url.starts_with("postgres"),
        "the soak runs on Postgres"
    );
    anyhow::ensure!(
        (1..=1000).contains(&args.batch_size) && args.clients >= 1,
        "--batch-size must be 1..1000 and --clients at least 1"
    );
    let db =
        crate::storage::scratch::ScratchDb::create(&args.database_url, "picket_bench_soak").await?;
    let result = soak(args, &db.url).await;
    db.drop_now().await?;
    result
}

async fn soak(args: &BenchSoakArgs, db_url: &str) -> anyhow::Result<SoakReport> {
    let operator = crate::access::auth::random_secret();
    let server = ServerChild::start(
        db_url,
        &operator,
        &[("PICKET_DETECTION".to_owned(), "true".to_owned())],
    )?;
    server.wait_leading_all_shards().await?;
    let channel = Channel::from_shared(format!("http://{}", server.addr))?
        .connect()
        .await?;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
    let (_, key) = tenant_with_key(
        &mut admin,
        &operator,
        "soak".into(),
        "soak",
        &[pb::Scope::Ingest, pb::Scope::Read],
    )
    .await?;
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let event = {
        let seq = seq.clone();
        move || {
            let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            pb::Event {
                occurred_at: Some(crate::grpc::convert::timestamp(Utc::now())),
                event_type: "user.login".into(),
                idempotency_key: format!("soak-{n}"),
                actor: format!("user{}@corp.example", n % 5000),
                action: "login".into(),
                resource: "/auth/login".into(),
                outcome: pb::Outcome::Success as i32,
                source_ip: format!(
                    "10.{}.{}.{}",
                    (n / 65536) % 256,
                    (n / 256) % 256,
                    n % 250 + 1
                ),
                ..Default::default()
            }
        }
    };

    // Capacity: clients sending back to back.
    let stop = CancellationToken::new();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (mut c, key, stop, sent, event, n) = (
            IngestServiceClient::new(channel.clone()),
            key.clone(),
            stop.clone(),
            sent.clone(),
            event.clone(),
            args.batch_size,
        );
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let events = (0..n).map(|_| event()).collect();
                if let Ok(r) = c
                    .ingest(with_key(pb::IngestRequest { events }, &key)?)
                    .await
                {
                    sent.fetch_add(
                        u64::from(r.into_inner().accepted),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }
            anyhow::Ok(())
        });
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.calibrate_seconds.max(1))).await;
    stop.cancel();
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    let capacity =
        sent.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let rate = args.rate.unwrap_or((capacity / 2.0) as u64).max(1);

    let record = Arc::new(Mutex::new(Record::default()));
    let t0 = Instant::now();
    let minute_of = move |at: Instant| (at - t0).as_secs() as usize / 60;
    let stop = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    // Subscribers: alerts (they also time the bursts), incidents, tails.
    for k in 0..args.subscribers {
        let (channel, key, stop, record) =
            (channel.clone(), key.clone(), stop.clone(), record.clone());
        background.spawn(async move {
            let options = Some(pb::WatchOptions {
                after_cursor: String::new(),
                heartbeat_interval_seconds: 5,
            });
            if k % 2 == 0 {
                let mut s = AlertServiceClient::new(channel)
                    .watch_alerts(with_key(
                        pb::WatchAlertsRequest {
                            filter: None,
                            options,
                        },
                        &key,
                    )?)
                    .await?
                    .into_inner();
                loop {
                    let item = tokio::select! {
                        m = s.message() => m?,
                        () = stop.cancelled() => return anyhow::Ok(()),
                    };
                    let Some(item) = item else { return Ok(()) };
                    if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item {
                        let now = Instant::now();
                        let mut r = record.lock().expect("not poisoned");
                        if let Some(lag) = ms_since(a.updated_at) {
                            r.deliveries.entry(minute_of(now)).or_default().push(lag);
                        }
                        for e in &a.entities {
                            if r.bursts.contains_key(&e.value) {
                                r.alerted.entry(e.value.clone()).or_insert(now);
                            }
                        }
                    }
                }
            } else {
                let mut s = IncidentServiceClient::new(channel)
                    .watch_incidents(with_key(
                        pb::WatchIncidentsRequest {
                            filter: None,
                            options,
                        },
                        &key,
                    )?)
                    .await?
                    .into_inner();
                loop {
                    let item = tokio::select! {
                        m = s.message() => m?,
                        () = stop.cancelled() => return anyhow::Ok(()),
                    };
                    if item.is_none() {
                        return Ok(());
                    }
                }
            }
        });
    }
    for _ in 0..args.tails {
        let (channel, key, stop, record) =
            (channel.clone(), key.clone(), stop.clone(), record.clone());
        background.spawn(async move {
            let mut s = IngestServiceClient::new(channel)
                .tail_events(with_key(
                    pb::TailEventsRequest {
                        filter: None,
                        options: Some(pb::WatchOptions {
                            after_cursor: String::new(),
                            heartbeat_interval_seconds: 5,
                        }),
                    },
                    &key,
                )?)
                .await?
                .into_inner();
            loop {
                let item = tokio::select! {
                    m = s.message() => m?,
                    () = stop.cancelled() => return anyhow::Ok(()),
                };
                let Some(item) = item else { return Ok(()) };
                if let Some(pb::tail_events_response::Item::Event(e)) = item.item
                    && let Some(lag) = ms_since(e.received_at)
                {
                    let now = Instant::now();
                    record
                        .lock()
                        .expect("not poisoned")
                        .deliveries
                        .entry(minute_of(now))
                        .or_default()
                        .push(lag);
                }
            }
        });
    }
    // The steady load: each client a batch every `period`.
    let period =
        Duration::from_secs_f64(args.batch_size as f64 * args.clients as f64 / rate as f64);
    let end = t0 + Duration::from_secs(args.duration_seconds.max(10));
    let mut load = tokio::task::JoinSet::new();
    for c in 0..args.clients {
        let (mut client, key, record, event, n) = (
            IngestServiceClient::new(channel.clone()),
            key.clone(),
            record.clone(),
            event.clone(),
            args.batch_size,
        );
        load.spawn(async move {
            let mut next = Instant::now() + period.mul_f64(c as f64 / 4.0);
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                next += period;
                let events = (0..n).map(|_| event()).collect();
                let sent = Instant::now();
                let r = client
                    .ingest(with_key(pb::IngestRequest { events }, &key)?)
                    .await;
                let took = sent.elapsed().as_secs_f64() * 1000.0;
                let mut rec = record.lock().expect("not poisoned");
                let m = minute_of(sent);
                match r {
                    Ok(r) => {
                        *rec.accepted.entry(m).or_default() += u64::from(r.into_inner().accepted);
                        rec.acks.entry(m).or_default().push(took);
                    }
                    Err(s) => {
                        *rec.errors
                            .entry(m)
                            .or_default()
                            .entry(format!("{:?}", s.code()))
                            .or_default() += 1;
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    // Bursts from fresh addresses.
    {
        let (mut client, key, record, every) = (
            IngestServiceClient::new(channel.clone()),
            key.clone(),
            record.clone(),
            Duration::from_secs(args.burst_every_seconds.max(1)),
        );
        load.spawn(async move {
            let mut k = 0u32;
            let mut next = Instant::now() + every;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                next += every;
                let ip = format!("198.18.{}.{}", k / 250, k % 250 + 1);
                let events = (0..8)
                    .map(|i| pb::Event {
                        occurred_at: Some(crate::grpc::convert::timestamp(Utc::now())),
                        event_type: "user.login".into(),
                        idempotency_key: format!("burst-{k}-{i}"),
                        actor: format!("victim{k}@corp.example"),
                        action: "login".into(),
                        resource: "/auth/login".into(),
                        outcome: pb::Outcome::Failure as i32,
                        source_ip: ip.clone(),
                        ..Default::default()
                    })
                    .collect();
                k += 1;
                record
                    .lock()
                    .expect("not poisoned")
                    .bursts
                    .insert(ip.clone(), Instant::now());
                client
                    .ingest(with_key(pb::IngestRequest { events }, &key)?)
                    .await
                    .context("a burst was refused")?;
                record
                    .lock()
                    .expect("not poisoned")
                    .bursts
                    .insert(ip, Instant::now());
            }
            anyhow::Ok(())
        });
    }
    // Per-minute samples of the server.
    let mut samples: Vec<(Option<f64>, f64, u64)> = Vec::new();
    while Instant::now() < end {
        let minute_end = t0 + Duration::from_secs(60 * (samples.len() as u64 + 1));
        tokio::time::sleep_until(minute_end.min(end).into()).await;
        let health = http_get(&server.addr, "/healthz").await.unwrap_or_default();
        let lag = serde_json::from_str::<serde_json::Value>(&health)
            .ok()
            .and_then(|v| v["detect_lag_seconds"].as_f64());
        samples.push((lag, server.memory()?.0, server.open_descriptors()?));
    }
    while let Some(t) = load.join_next().await {
        t??;
    }
    // Every burst alerted, or 60 s more.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = {
            let r = record.lock().expect("not poisoned");
            r.bursts.keys().all(|ip| r.alerted.contains_key(ip))
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    while let Some(t) = background.join_next().await {
        // A subscriber ending with the server is not a soak failure.
        let _ = t;
    }

    let mut r = record.lock().expect("not poisoned");
    let mut minutes = Vec::new();
    for (i, (lag, rss, fds)) in samples.iter().enumerate() {
        let mut acks = r.acks.remove(&i).unwrap_or_default();
        let mut deliveries = r.deliveries.remove(&i).unwrap_or_default();
        minutes.push(Minute {
            minute: i + 1,
            accepted: r.accepted.get(&i).copied().unwrap_or(0),
            errors: r.errors.remove(&i).unwrap_or_default(),
            ack_p50_ms: percentile(&mut acks, 0.5),
            ack_p99_ms: percentile(&mut acks, 0.99),
            detect_lag_s: *lag,
            delivery_p99_ms: percentile(&mut deliveries, 0.99),
            rss_mib: *rss,
            fds: *fds,
        });
    }
    let mut burst_lags: Vec<f64> = r
        .bursts
        .iter()
        .filter_map(|(ip, sent)| Some((*r.alerted.get(ip)? - *sent).as_secs_f64() * 1000.0))
        .collect();
    let bursts = r.bursts.len();
    let bursts_alerted = r
        .bursts
        .keys()
        .filter(|ip| r.alerted.contains_key(*ip))
        .count();
    // Least-squares slope of RSS over the minutes after the warm-up (at
    // most a third of the run; at least the first two minutes).
    let warmup = (args.warmup_minutes as usize).min(minutes.len() / 3).max(2);
    let warm: Vec<(f64, f64)> = minutes
        .iter()
        .skip(warmup)
        .map(|m| (m.minute as f64, m.rss_mib))
        .collect();
    let slope = if warm.len() >= 2 {
        let n = warm.len() as f64;
        let (sx, sy) = warm.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
        let (mx, my) = (sx / n, sy / n);
        let num: f64 = warm.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let den: f64 = warm.iter().map(|p| (p.0 - mx).powi(2)).sum();
        if den > 0.0 { num / den } else { 0.0 }
    } else {
        0.0
    };
    let rss_max = minutes.iter().map(|m| m.rss_mib).fold(0.0, f64::max);
    let mut failed = Vec::new();
    let errors: u64 = minutes.iter().flat_map(|m| m.errors.values()).sum();
    if errors > 0 {
        failed.push(format!("{errors} failed calls"));
    }
    if bursts_alerted < bursts {
        failed.push(format!(
            "{} of {bursts} bursts not alerted",
            bursts - bursts_alerted
        ));
    }
    if let (Some(first), Some(last)) = (minutes.first(), minutes.last())
        && last.ack_p99_ms > 1.5 * first.ack_p99_ms
    {
        failed.push(format!(
            "p99 ack latency grew from {:.1} ms to {:.1} ms",
            first.ack_p99_ms, last.ack_p99_ms
        ));
    }
    if slope >= 1.0 {
        failed.push(format!("RSS grows {slope:.2} MiB/minute"));
    }
    if rss_max * 1.048_576 >= 300.0 {
        failed.push(format!("RSS reached {rss_max:.1} MiB"));
    }
    Ok(SoakReport {
        capacity_events_per_sec: capacity,
        rate_events_per_sec: rate,
        minutes,
        bursts,
        bursts_alerted,
        burst_alert_p99_ms: percentile(&mut burst_lags, 0.99),
        warmup_minutes: warmup,
        rss_slope_mib_per_min: slope,
        rss_max_mib: rss_max,
        passed: failed.is_empty(),
        failed,
    })
}
