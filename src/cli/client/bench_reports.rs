//! `picket bench reports`: the audit log at scale.
//!
//! It loads a store with realistic events for one tenant plus events spread
//! over other tenants across N days (by default 10,000,000 + 10,000,000 over
//! 100 tenants and 30 days; COPY on Postgres, the ingest path on SQLite),
//! starts the server in this process over it, and measures with the real
//! gRPC client: QueryEvents first pages (a 1-hour range; each EventFilter
//! field alone matching about 0.1 % of the tenant's events over the whole
//! span; a filter matching nothing), ExportEvents of one day (events/s to
//! the client in batches of 500 and one event per message, the process's
//! memory), and retention of the oldest day.
//! Every filter's plan is read from the store and must use its index. On
//! Postgres the run gets a fresh database, dropped at the end.
//!
//! The data is built so that each filter value matches a known share: 1,000
//! actors, 1,000 source IPs and 1,000 resource prefixes (`svc{k}/`), each
//! drawn uniformly; the event type `firewall.rule_changed` and the outcome
//! UNKNOWN are 0.1 % of events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::client::bench_detect::RunStore;
use crate::cli::client::{tenant_with_key, with_key};
use crate::domain::TenantId;
use crate::domain::event::{EventQuery, NewEvent, Outcome};
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;
use crate::grpc::pb::report_service_client::ReportServiceClient;
use crate::server::config::Settings;
use crate::server::startup::Application;
use crate::storage::ceiling::PgBulkLoader;
use crate::storage::scratch::ScratchDb;
use crate::storage::{Backend, Store};

/// `picket bench reports` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchReportsArgs {
    /// A Postgres URL of the cluster to use (a fresh database is created
    /// through it and dropped afterwards), or a SQLite URL (a new file).
    /// Without it, a fresh SQLite store in a temporary directory.
    #[arg(long, env = "PICKET_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Events of the measured tenant.
    #[arg(long, default_value_t = 10_000_000)]
    pub tenant_events: u64,
    /// Events of the other tenants, together.
    #[arg(long, default_value_t = 10_000_000)]
    pub other_events: u64,
    /// How many other tenants.
    #[arg(long, default_value_t = 100)]
    pub other_tenants: u32,
    /// Days the events span, ending now.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// Requests per query kind.
    #[arg(long, default_value_t = 50)]
    pub requests: usize,
    /// ExportEvents runs of one day.
    #[arg(long, default_value_t = 3)]
    pub exports: usize,
    /// Loading connections (Postgres).
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Page size of the QueryEvents requests.
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Keep the database (Postgres) or file (SQLite) and print its URL.
    #[arg(long)]
    pub keep_store: bool,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Percentiles of one query kind, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct QueryFigure {
    /// What was asked.
    pub name: String,
    /// Requests made.
    pub requests: usize,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Mean events per page returned.
    pub mean_rows: f64,
    /// The target for p95, if it sets one.
    pub target_p95_ms: Option<f64>,
    /// p95 within the target.
    pub met: Option<bool>,
    /// The index the store's plan reads (None: none expected, or not found).
    pub index: Option<String>,
    /// The store's plan reads an index for the filter, not a scan of the range.
    pub plan_uses_index: bool,
    /// The three slowest requests: (request number from 0, ms), to tell a
    /// cold first request from slow ones spread over the run.
    pub slowest: Vec<(usize, f64)>,
}

/// ExportEvents of one day.
#[derive(Debug, Clone, Serialize)]
pub struct ExportFigure {
    /// Runs made.
    pub runs: usize,
    /// Events in the day exported.
    pub events: u64,
    /// Events per message asked for (`max_events_per_message`).
    pub events_per_message: u32,
    /// Events per second to the client, median of the runs.
    pub events_per_sec: f64,
    /// Slowest run's events per second.
    pub min_events_per_sec: f64,
    /// Events per second to the client with one event per message (the
    /// form of clients written before batches), median of the runs.
    pub single_events_per_sec: f64,
    /// Resident memory of this process (server + client) before the first run, in MiB.
    pub rss_before_mib: f64,
    /// Highest resident memory sampled during the runs, in MiB.
    pub rss_max_mib: f64,
    /// Per batched run, in order: events per second and the MiB the
    /// machine's disks read meanwhile (`/proc/diskstats`; `None` where that
    /// is not readable). The first run of a day not in the page cache reads
    /// it from disk; the runs after it show the rate from memory.
    pub run_disk_reads: Vec<(f64, Option<f64>)>,
    /// Target: ≥ 100,000 events/s.
    pub met: bool,
}

/// Retention of the oldest day.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionFigure {
    /// `drop partition` (Postgres) or `delete rows` (SQLite).
    pub method: String,
    /// Events removed.
    pub events: u64,
    /// Time to remove the day's events, in seconds.
    pub seconds: f64,
    /// Time to delete the day's idempotency keys afterwards (Postgres), in seconds.
    pub keys_seconds: Option<f64>,
    /// Events table size before, in bytes (Postgres: all partitions and indexes).
    pub bytes_before: Option<i64>,
    /// Events table size after, in bytes.
    pub bytes_after: Option<i64>,
    /// Dead rows left in the events partitions (Postgres statistics).
    pub dead_rows_after: Option<i64>,
    /// Target: under 1 s and no bloat.
    pub met: bool,
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct ReportsReport {
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// Events of the measured tenant.
    pub tenant_events: u64,
    /// Events of the other tenants.
    pub other_events: u64,
    /// Other tenants.
    pub other_tenants: u32,
    /// Days spanned.
    pub days: u32,
    /// Load time, in seconds.
    pub load_seconds: f64,
    /// Events loaded per second.
    pub load_events_per_sec: f64,
    /// Events the report rollups folded in after the load.
    pub rolled_events: u64,
    /// Time the rollups took to catch up with the load, in seconds.
    pub rollup_seconds: f64,
    /// One entry per query kind.
    pub queries: Vec<QueryFigure>,
    /// ExportEvents of one day.
    pub export: ExportFigure,
    /// Retention of the oldest day.
    pub retention: RetentionFigure,
}

/// Kinds of value drawn by the generator (the share each one matches).
const VALUES: u64 = 1000;
/// The rare event type (0.1 %).
const RARE_TYPE: &str = "firewall.rule_changed";

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchReportsArgs) -> anyhow::Result<()> {
    let r = bench(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("backend            {}", r.backend);
    println!(
        "load               {} + {} events over {} other tenants, {} days: {:.0} s ({:.0} events/s)",
        r.tenant_events,
        r.other_events,
        r.other_tenants,
        r.days,
        r.load_seconds,
        r.load_events_per_sec
    );
    println!(
        "rollups            {} events folded in {:.1} s ({:.0} events/s)",
        r.rolled_events,
        r.rollup_seconds,
        r.rolled_events as f64 / r.rollup_seconds.max(1e-9)
    );
    for q in &r.queries {
        println!(
            "{:<50} p50 {:>8.2} ms  p95 {:>8.2} ms  max {:>8.2} ms  rows {:>6.1}  index {}  target {}",
            q.name,
            q.p50_ms,
            q.p95_ms,
            q.max_ms,
            q.mean_rows,
            q.index.as_deref().unwrap_or("-"),
            match (q.target_p95_ms, q.met) {
                (Some(t), Some(true)) => format!("p95 ≤ {t} ms met"),
                (Some(t), _) => format!("p95 ≤ {t} ms NOT met"),
                _ => "-".into(),
            }
        );
    }
    let e = &r.export;
    println!(
        "export one day     {} events: {:.0} events/s in batches of {} (slowest run {:.0}; one event per message {:.0}); RSS {:.0} → max {:.0} MiB; target ≥ 100k/s {}",
        e.events,
        e.events_per_sec,
        e.events_per_message,
        e.min_events_per_sec,
        e.single_events_per_sec,
        e.rss_before_mib,
        e.rss_max_mib,
        if e.met { "met" } else { "NOT met" }
    );
    let runs: Vec<String> = e
        .run_disk_reads
        .iter()
        .map(|(rate, mib)| match mib {
            Some(mib) => format!("{rate:.0}/s reading {mib:.0} MiB from disk"),
            None => format!("{rate:.0}/s"),
        })
        .collect();
    println!("export runs        {}", runs.join("; "));
    let t = &r.retention;
    println!(
        "retention          oldest day by {}: {} events in {:.3} s{}; target < 1 s, no bloat {}",
        t.method,
        t.events,
        t.seconds,
        t.keys_seconds
            .map(|k| format!(" (keys deleted in {k:.2} s more)"))
            .unwrap_or_default(),
        if t.met { "met" } else { "NOT met" }
    );
    Ok(())
}

/// Where the run's data lives.
enum RunDb {
    /// A fresh Postgres database.
    Pg(ScratchDb),
    /// A SQLite file (temporary or given).
    Lite(RunStore),
}

impl RunDb {
    fn url(&self) -> &str {
        match self {
            RunDb::Pg(db) => &db.url,
            RunDb::Lite(s) => &s.url,
        }
    }

    async fn finish(self, keep: bool) -> anyhow::Result<()> {
        match self {
            RunDb::Pg(db) if keep => {
                eprintln!("store kept: {}", db.url);
                Ok(())
            }
            RunDb::Pg(db) => db.drop_now().await,
            RunDb::Lite(s) => {
                s.finish(keep);
                Ok(())
            }
        }
    }
}

/// Runs the benchmark.
pub async fn bench(args: &BenchReportsArgs) -> anyhow::Result<ReportsReport> {
    anyhow::ensure!(args.days >= 2, "--days must be at least 2");
    anyhow::ensure!(args.requests >= 1, "--requests must be at least 1");
    anyhow::ensure!(
        args.tenant_events >= u64::from(args.days) * 24,
        "--tenant-events must be at least 24 per day"
    );
    let db = match args.database_url.as_deref() {
        Some(url) if Backend::from_url(url) == Some(Backend::Postgres) => {
            RunDb::Pg(ScratchDb::create(url, "picket_bench_reports").await?)
        }
        other => RunDb::Lite(RunStore::open(other)?),
    };
    let result = measure(args, db.url()).await;
    db.finish(args.keep_store).await?;
    result
}

async fn measure(args: &BenchReportsArgs, url: &str) -> anyhow::Result<ReportsReport> {
    let operator = crate::access::auth::random_secret();
    let mut settings = Settings::with_database(Some(url));
    settings.listen = "127.0.0.1:0".parse().expect("static address");
    settings.admin_token = Some(SecretString::from(operator.clone()));
    // The feed of tens of millions of loaded events is not what is measured.
    settings.detection = false;
    // The rollups catch up in one timed pass after the load (below).
    settings.rollup_interval_ms = 0;
    let app = Application::build(settings)
        .await
        .context("failed to start the server")?;
    let store = app.store();
    let backend = store.backend();
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut admin = AdminServiceClient::new(channel.clone());
    let run_id = hex::encode(rand::random::<[u8; 4]>());
    let (tenant_id, key) = tenant_with_key(
        &mut admin,
        &operator,
        format!("bench-reports-{run_id}"),
        "bench",
        &[pb::Scope::Read],
    )
    .await?;
    let tenant =
        TenantId::parse(&tenant_id, "tenant").map_err(|v| anyhow::anyhow!(v.description))?;
    let mut others = Vec::new();
    for n in 0..args.other_tenants {
        let t = admin
            .create_tenant(with_key(
                pb::CreateTenantRequest {
                    name: format!("bench-reports-{run_id}-{n}"),
                    ..Default::default()
                },
                &operator,
            )?)
            .await?
            .into_inner()
            .tenant
            .context("no tenant")?;
        others.push(TenantId::parse(&t.id, "tenant").map_err(|v| anyhow::anyhow!(v.description))?);
    }

    // The span: whole hours, ending at the current hour.
    let now = Utc::now();
    let end = DateTime::from_timestamp(now.timestamp() - now.timestamp().rem_euclid(3600), 0)
        .context("time out of range")?;
    let start = end - chrono::Duration::days(i64::from(args.days));
    let first_day = start.date_naive();
    store
        .prepare_event_days(first_day, end.date_naive())
        .await
        .context("failed to prepare the partitions of the span")?;

    let started = Instant::now();
    load(args, url, &store, tenant, &others, start).await?;
    let load_seconds = started.elapsed().as_secs_f64();
    let total = args.tenant_events + args.other_events;
    if backend == Backend::Postgres {
        PgBulkLoader::connect(url).await?.analyze().await?;
    } else {
        store
            .refresh_statistics()
            .await
            .context("failed to refresh the planner statistics")?;
    }
    // The report rollups fold the loaded events in (the server's own task is
    // off, so this pass is the whole catch-up and is timed alone).
    // On Postgres the feed only moves past events once every older
    // transaction on the cluster has ended (see the ingest feed), so with
    // other work on the same cluster one pass can stop short of the last
    // loaded event: passes repeat until every loaded event is folded (or a
    // minute passes without progress).
    let started = Instant::now();
    let mut rolled = 0u64;
    let mut progress = Instant::now();
    while rolled < total && progress.elapsed() < Duration::from_secs(60) {
        let n = crate::reports::rollup::run_once(
            store.as_ref(),
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .context("failed to roll up the loaded events")?;
        if n > 0 {
            progress = Instant::now();
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rolled += n;
    }
    let rollup_seconds = started.elapsed().as_secs_f64();
    if backend == Backend::Postgres {
        PgBulkLoader::connect(url).await?.analyze().await?;
    }

    let ingest = IngestServiceClient::new(channel.clone());
    let mut queries = Vec::new();
    for kind in QueryKind::ALL {
        queries.push(query_kind(args, &store, &ingest, &key, tenant, kind, start, end).await?);
    }
    queries.extend(report_rpcs(args, &channel, &key, start, end).await?);

    let export = export_day(args, &channel, &key, start).await?;
    let retention = retention_day(url, &store, tenant, &others, first_day).await?;

    let _ = stop.send(());
    server.await.context("server panicked")??;
    Ok(ReportsReport {
        backend: backend.as_str().to_owned(),
        tenant_events: args.tenant_events,
        other_events: args.other_events,
        other_tenants: args.other_tenants,
        days: args.days,
        load_seconds,
        load_events_per_sec: total as f64 / load_seconds.max(1e-9),
        rolled_events: rolled,
        rollup_seconds,
        queries,
        export,
        retention,
    })
}

/// One generated event: `i` of tenant number `t`, at `at`.
fn event(rng: &mut impl Rng, t: u32, i: u64, at: DateTime<Utc>) -> anyhow::Result<NewEvent> {
    let actor = rng.random_range(0..VALUES);
    let ip = rng.random_range(0..VALUES);
    let svc = rng.random_range(0..VALUES);
    let mut e = pb::Event {
        occurred_at: Some(crate::grpc::convert::timestamp(at)),
        idempotency_key: format!("{t}-{i}"),
        actor: format!("user{actor}@corp.example"),
        source_ip: format!("10.{}.{}.{}", ip / 250, ip % 250, 1 + (ip % 7)),
        source_system: "picket-bench".into(),
        service: ["checkout", "accounts", "billing", "web"][(svc % 4) as usize].into(),
        environment: "production".into(),
        ..Default::default()
    };
    let roll = rng.random_range(0..1000u32);
    let outcome = match rng.random_range(0..1000u32) {
        0 => pb::Outcome::Unknown,
        1..=100 => pb::Outcome::Failure,
        _ => pb::Outcome::Success,
    };
    e.outcome = outcome as i32;
    match roll {
        0 => {
            e.event_type = RARE_TYPE.into();
            e.action = "update".into();
            e.resource = format!("svc{svc}/firewall/rules/{}", rng.random_range(0..50));
        }
        1..=700 => {
            let path = [
                "orders",
                "users/42",
                "reports",
                "static/app.js",
                "admin/settings",
            ][rng.random_range(0..5)];
            e.event_type = "http_request".into();
            e.action = "GET".into();
            e.resource = format!("svc{svc}/api/v1/{path}");
            e.http = Some(pb::HttpDetails {
                method: "GET".into(),
                path: format!("/api/v1/{path}"),
                status_code: if outcome == pb::Outcome::Failure {
                    403
                } else {
                    200
                },
                latency_ms: rng.random_range(1.0..400.0),
                bytes_in: rng.random_range(0..2000),
                bytes_out: rng.random_range(100..200_000),
                user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36".into(),
                route: format!("/api/v1/{path}"),
            });
        }
        701..=880 => {
            e.event_type = "user.login".into();
            e.action = "login".into();
            e.resource = format!("svc{svc}/login");
            e.auth = Some(pb::AuthDetails {
                method: "password".into(),
                mfa_used: outcome == pb::Outcome::Success,
                failure_reason: if outcome == pb::Outcome::Failure {
                    "bad_password".into()
                } else {
                    String::new()
                },
                ..Default::default()
            });
        }
        881..=960 => {
            e.event_type = "api.call".into();
            e.action = "invoke".into();
            e.resource = format!("svc{svc}/orders.list");
        }
        961..=980 => {
            e.event_type = "vpn.connect".into();
            e.action = "connect".into();
            e.resource = format!("svc{svc}/vpn-gw-1");
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
            e.resource = format!("svc{svc}/orders-db");
            e.database = Some(pb::DatabaseDetails {
                system: "postgres".into(),
                database: "orders".into(),
                db_user: "app".into(),
                ..Default::default()
            });
        }
    }
    e.attributes = std::collections::HashMap::from([("region".into(), "eu-west-1".into())]);
    crate::grpc::events::event_from_pb(&e, Utc::now(), 0)
        .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.description))
}

/// The events of hour `h` of the span: the measured tenant's share and
/// every other tenant's, evenly spread over the hour.
fn hour_rows(
    args: &BenchReportsArgs,
    tenant: TenantId,
    others: &[TenantId],
    start: DateTime<Utc>,
    h: u64,
    hours: u64,
) -> anyhow::Result<Vec<(TenantId, NewEvent)>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(h);
    let from = start + chrono::Duration::hours(h as i64);
    let share = |n: u64| (n * (h + 1) / hours) - (n * h / hours);
    let mut rows = Vec::new();
    let mut add =
        |t: u32, id: TenantId, n: u64, base: u64, rows: &mut Vec<(TenantId, NewEvent)>| {
            for k in 0..n {
                let at =
                    from + chrono::Duration::microseconds((k * 3_600_000_000 / n.max(1)) as i64);
                rows.push((id, event(&mut rng, t, base + k, at)?));
            }
            anyhow::Ok(())
        };
    add(
        0,
        tenant,
        share(args.tenant_events),
        args.tenant_events * h / hours,
        &mut rows,
    )?;
    if !others.is_empty() {
        let per = args.other_events / others.len() as u64;
        for (n, id) in others.iter().enumerate() {
            add(n as u32 + 1, *id, share(per), per * h / hours, &mut rows)?;
        }
    }
    Ok(rows)
}

/// Loads the span hour by hour: COPY on `args.writers` connections on
/// Postgres, the store's insert (the ingest path's) on SQLite.
async fn load(
    args: &BenchReportsArgs,
    url: &str,
    store: &Arc<dyn Store>,
    tenant: TenantId,
    others: &[TenantId],
    start: DateTime<Utc>,
) -> anyhow::Result<()> {
    let hours = u64::from(args.days) * 24;
    let writers = args.writers.max(1) as u64;
    let postgres = store.backend() == Backend::Postgres;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(TenantId, NewEvent)>>(2);
        let gen_args = args.clone();
        let others = others.to_vec();
        // Generation on a blocking thread, overlapping the writes.
        let producer = tokio::task::spawn_blocking(move || {
            let mut h = w;
            while h < hours {
                let rows = hour_rows(&gen_args, tenant, &others, start, h, hours)?;
                if tx.blocking_send(rows).is_err() {
                    break;
                }
                h += writers;
            }
            anyhow::Ok(())
        });
        let url = url.to_owned();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut loader = if postgres {
                Some(PgBulkLoader::connect(&url).await?)
            } else {
                None
            };
            while let Some(rows) = rx.recv().await {
                match loader.as_mut() {
                    Some(l) => l.load(&rows).await?,
                    None => {
                        for chunk in rows.chunks(2000) {
                            let mut groups: Vec<(TenantId, Vec<NewEvent>)> = Vec::new();
                            for (t, e) in chunk {
                                match groups.last_mut() {
                                    Some((g, v)) if g == t => v.push(e.clone()),
                                    _ => groups.push((*t, vec![e.clone()])),
                                }
                            }
                            let refs: Vec<(TenantId, &[NewEvent])> =
                                groups.iter().map(|(t, v)| (*t, v.as_slice())).collect();
                            store.insert_events(&refs).await?;
                        }
                    }
                }
            }
            producer.await.context("generator panicked")??;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("loader panicked")??;
    }
    Ok(())
}

/// The query kinds measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryKind {
    /// First page of a 1-hour range.
    Hour,
    /// Actor, over the whole span.
    Actor,
    /// Source IP.
    SourceIp,
    /// Event type.
    EventType,
    /// Resource prefix.
    ResourcePrefix,
    /// Outcome.
    Outcome,
    /// An actor that never appears.
    Nothing,
}

impl QueryKind {
    const ALL: [QueryKind; 7] = [
        QueryKind::Hour,
        QueryKind::Actor,
        QueryKind::SourceIp,
        QueryKind::EventType,
        QueryKind::ResourcePrefix,
        QueryKind::Outcome,
        QueryKind::Nothing,
    ];

    fn name(self) -> &'static str {
        match self {
            QueryKind::Hour => "QueryEvents 1-hour range",
            QueryKind::Actor => "QueryEvents actor (0.1 %), all days",
            QueryKind::SourceIp => "QueryEvents source_ip (0.1 %), all days",
            QueryKind::EventType => "QueryEvents event_type (0.1 %), all days",
            QueryKind::ResourcePrefix => "QueryEvents resource_prefix (0.1 %), all days",
            QueryKind::Outcome => "QueryEvents outcome (0.1 %), all days",
            QueryKind::Nothing => "QueryEvents filter matching nothing",
        }
    }

    fn target_ms(self) -> f64 {
        match self {
            QueryKind::Hour | QueryKind::Nothing => 50.0,
            _ => 100.0,
        }
    }

    /// The index meant to answer it (on Postgres each partition's copy of
    /// it, named after its columns).
    fn index(self) -> &'static str {
        match self {
            QueryKind::Hour => "events_occurred",
            QueryKind::Actor | QueryKind::Nothing => "events_actor",
            QueryKind::SourceIp => "events_source_ip",
            QueryKind::EventType => "events_type",
            QueryKind::ResourcePrefix => "events_resource_segment",
            QueryKind::Outcome => "events_outcome",
        }
    }

    /// The column whose condition the plan must answer from an index.
    fn column(self) -> &'static str {
        match self {
            QueryKind::Hour => "occurred_at",
            QueryKind::Actor | QueryKind::Nothing => "actor",
            QueryKind::SourceIp => "source_ip",
            QueryKind::EventType => "event_type",
            QueryKind::ResourcePrefix => "resource_segment",
            QueryKind::Outcome => "outcome",
        }
    }

    /// Request `n`'s time range and filter.
    fn request(
        self,
        rng: &mut impl Rng,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> (DateTime<Utc>, DateTime<Utc>, pb::EventFilter) {
        let v = rng.random_range(0..VALUES);
        let mut f = pb::EventFilter::default();
        match self {
            QueryKind::Hour => {
                let hours = (end - start).num_hours().max(1);
                let from = start + chrono::Duration::hours(rng.random_range(0..hours));
                return (from, from + chrono::Duration::hours(1), f);
            }
            QueryKind::Actor => f.actor = format!("user{v}@corp.example"),
            QueryKind::SourceIp => {
                f.source_ip = format!("10.{}.{}.{}", v / 250, v % 250, 1 + (v % 7))
            }
            QueryKind::EventType => f.event_types = vec![RARE_TYPE.into()],
            QueryKind::ResourcePrefix => f.resource_prefix = format!("svc{v}/"),
            QueryKind::Outcome => f.outcome = pb::Outcome::Unknown as i32,
            QueryKind::Nothing => f.actor = "nobody@absent.example".into(),
        }
        (start, end, f)
    }
}

/// The store's query for a filter (to read its plan).
fn domain_query(
    f: &pb::EventFilter,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: u32,
) -> EventQuery {
    EventQuery {
        start: Some(from),
        end: Some(to),
        event_types: f.event_types.clone(),
        actor: (!f.actor.is_empty()).then(|| f.actor.clone()),
        source_ip: f.source_ip.parse().ok(),
        resource_prefix: (!f.resource_prefix.is_empty()).then(|| f.resource_prefix.clone()),
        outcome: (f.outcome == pb::Outcome::Unknown as i32).then_some(Outcome::Unknown),
        limit: limit + 1,
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
async fn query_kind(
    args: &BenchReportsArgs,
    store: &Arc<dyn Store>,
    ingest: &IngestServiceClient<Channel>,
    key: &str,
    tenant: TenantId,
    kind: QueryKind,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<QueryFigure> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(kind as u64 + 100);
    let (from, to, f) = kind.request(&mut rng, start, end);
    let plan = store
        .explain_query_events(tenant, &domain_query(&f, from, to, args.page_size))
        .await?
        .join("\n");
    let index = kind.index();
    let plan_uses_index = crate::storage::plan_reads_index(&plan, kind.column());
    let mut ingest = ingest.clone();
    let mut took = Vec::with_capacity(args.requests);
    let mut rows = 0usize;
    for _ in 0..args.requests {
        let (from, to, filter) = kind.request(&mut rng, start, end);
        let req = pb::QueryEventsRequest {
            time_range: Some(pb::TimeRange {
                start: Some(crate::grpc::convert::timestamp(from)),
                end: Some(crate::grpc::convert::timestamp(to)),
            }),
            filter: Some(filter),
            page_size: args.page_size,
            page_token: String::new(),
        };
        let t = Instant::now();
        let page = ingest.query_events(with_key(req, key)?).await?.into_inner();
        took.push(t.elapsed());
        rows += page.events.len();
    }
    let (p50, p95, max) = percentiles(&took);
    let target = kind.target_ms();
    Ok(QueryFigure {
        name: kind.name().into(),
        requests: args.requests,
        p50_ms: p50,
        p95_ms: p95,
        max_ms: max,
        mean_rows: rows as f64 / args.requests as f64,
        target_p95_ms: Some(target),
        met: Some(p95 <= target),
        index: plan_uses_index.then(|| index.to_owned()),
        plan_uses_index,
        slowest: slowest(&took),
    })
}

/// The report RPCs, each `args.requests` times with the target:
/// dashboard metrics over the span in 1-hour buckets (p95 ≤ 200 ms), the
/// security summary over the span (p95 ≤ 500 ms), the access report over the
/// last 24 hours (first page, p95 ≤ 500 ms).
async fn report_rpcs(
    args: &BenchReportsArgs,
    channel: &Channel,
    key: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<Vec<QueryFigure>> {
    let mut client = ReportServiceClient::new(channel.clone()).max_decoding_message_size(1 << 26);
    let range = |from: DateTime<Utc>| pb::TimeRange {
        start: Some(crate::grpc::convert::timestamp(from)),
        end: Some(crate::grpc::convert::timestamp(end)),
    };
    let mut out = Vec::new();
    for (kind, name, target) in [
        (0, "GetDashboardMetrics, whole span, 1-hour buckets", 200.0),
        (1, "GetSecuritySummary, whole span", 500.0),
        (2, "GetAccessReport, last 24 hours, first page", 500.0),
    ] {
        let mut took = Vec::with_capacity(args.requests);
        let mut rows = 0usize;
        for _ in 0..args.requests {
            let t = Instant::now();
            rows += match kind {
                0 => {
                    let req = pb::GetDashboardMetricsRequest {
                        time_range: Some(range(start)),
                        bucket_seconds: 3600,
                        ..Default::default()
                    };
                    let r = client.get_dashboard_metrics(with_key(req, key)?).await?;
                    r.into_inner().buckets.len()
                }
                1 => {
                    let req = pb::GetSecuritySummaryRequest {
                        time_range: Some(range(start)),
                        ..Default::default()
                    };
                    client.get_security_summary(with_key(req, key)?).await?;
                    1
                }
                _ => {
                    let req = pb::GetAccessReportRequest {
                        time_range: Some(range(end - chrono::Duration::hours(24))),
                        page_size: args.page_size,
                        ..Default::default()
                    };
                    let r = client.get_access_report(with_key(req, key)?).await?;
                    r.into_inner().rows.len()
                }
            };
            took.push(t.elapsed());
        }
        let (p50, p95, max) = percentiles(&took);
        out.push(QueryFigure {
            name: name.into(),
            requests: args.requests,
            p50_ms: p50,
            p95_ms: p95,
            max_ms: max,
            mean_rows: rows as f64 / args.requests.max(1) as f64,
            target_p95_ms: Some(target),
            met: Some(p95 <= target),
            index: None,
            plan_uses_index: false,
            slowest: slowest(&took),
        });
    }
    Ok(out)
}

/// The three slowest of `d`: (position, ms), slowest first.
fn slowest(d: &[Duration]) -> Vec<(usize, f64)> {
    let mut v: Vec<(usize, f64)> = d
        .iter()
        .enumerate()
        .map(|(i, x)| (i, x.as_secs_f64() * 1000.0))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(3);
    v
}

/// Nearest-rank p50, p95 and max, in milliseconds.
fn percentiles(d: &[Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = d.iter().map(|x| x.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    (rank(0.5), rank(0.95), ms[ms.len() - 1])
}

/// This process's resident memory, in MiB (0 where /proc is absent).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Events per message the export runs ask for.
const EXPORT_BATCH: u32 = 500;

/// One ExportEvents of `[from, to)` with `per_message` events per message
/// (0: one each): the events received and their rate to the client.
async fn export_once(
    channel: &Channel,
    key: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    per_message: u32,
) -> anyhow::Result<(u64, f64)> {
    let mut client = ReportServiceClient::new(channel.clone()).max_decoding_message_size(1 << 24);
    let req = pb::ExportEventsRequest {
        time_range: Some(pb::TimeRange {
            start: Some(crate::grpc::convert::timestamp(from)),
            end: Some(crate::grpc::convert::timestamp(to)),
        }),
        filter: None,
        after_cursor: String::new(),
        max_events_per_message: per_message,
    };
    let t = Instant::now();
    let mut stream = client
        .export_events(with_key(req, key)?)
        .await?
        .into_inner();
    let mut n = 0u64;
    while let Some(msg) = stream.message().await? {
        n += u64::from(msg.event.is_some()) + msg.events.len() as u64;
    }
    Ok((n, n as f64 / t.elapsed().as_secs_f64().max(1e-9)))
}

/// ExportEvents of the span's second day, `args.exports` times in batches,
/// then as many times one event per message.
async fn export_day(
    args: &BenchReportsArgs,
    channel: &Channel,
    key: &str,
    start: DateTime<Utc>,
) -> anyhow::Result<ExportFigure> {
    let day = start.date_naive() + chrono::Days::new(1);
    let from = day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let to = from + chrono::Duration::days(1);
    let rss_before = rss_mib();
    let rss_max = Arc::new(std::sync::Mutex::new(rss_before));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let rss_max = rss_max.clone();
        let stop = sampling.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = stop.cancelled() => return,
                }
                let now = rss_mib();
                let mut m = rss_max.lock().expect("not poisoned");
                *m = m.max(now);
            }
        })
    };
    let runs = args.exports.max(1);
    let mut rates = Vec::new();
    let mut single = Vec::new();
    let mut events = 0;
    let mut run_disk_reads = Vec::new();
    for _ in 0..runs {
        let read_before = disk_read_mib();
        let (n, rate) = export_once(channel, key, from, to, EXPORT_BATCH).await?;
        let read = read_before.zip(disk_read_mib()).map(|(a, b)| b - a);
        run_disk_reads.push((rate, read));
        rates.push(rate);
        events = n;
    }
    for _ in 0..runs {
        let (n, rate) = export_once(channel, key, from, to, 0).await?;
        anyhow::ensure!(
            n == events,
            "one event per message exported {n} of {events} events"
        );
        single.push(rate);
    }
    sampling.cancel();
    let _ = sampler.await;
    rates.sort_by(f64::total_cmp);
    single.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let rss_max = *rss_max.lock().expect("not poisoned");
    Ok(ExportFigure {
        runs: rates.len(),
        events,
        events_per_message: EXPORT_BATCH,
        events_per_sec: median,
        min_events_per_sec: rates[0],
        single_events_per_sec: single[single.len() / 2],
        rss_before_mib: rss_before,
        rss_max_mib: rss_max,
        run_disk_reads,
        met: median >= 100_000.0,
    })
}

/// MiB read so far by the machine's whole disks (`/proc/diskstats`: the
/// sectors-read field of devices that are not partitions, loops or RAM
/// disks), or `None` off Linux.
fn disk_read_mib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/diskstats").ok()?;
    let mut sectors = 0u64;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = f.get(2) else { continue };
        let whole = std::path::Path::new("/sys/block").join(name).exists();
        if !whole || name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        sectors += f.get(5).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(sectors as f64 * 512.0 / (1024.0 * 1024.0))
}

/// Removes the span's first (oldest) day for every tenant: on Postgres by
/// dropping its partition (every tenant's cutoff is past it), on SQLite by
/// deleting rows.
async fn retention_day(
    url: &str,
    store: &Arc<dyn Store>,
    tenant: TenantId,
    others: &[TenantId],
    first_day: chrono::NaiveDate,
) -> anyhow::Result<RetentionFigure> {
    let cutoff = (first_day + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let mut tenants = vec![tenant];
    tenants.extend_from_slice(others);
    let keep: Vec<(TenantId, Option<DateTime<Utc>>)> =
        tenants.iter().map(|t| (*t, Some(cutoff))).collect();
    if store.backend() == Backend::Postgres {
        let mut pg = PgBulkLoader::connect(url).await?;
        let (bytes_before, _) = pg.footprint().await?;
        let t = Instant::now();
        let dropped = store.drop_event_days(&keep).await?;
        let seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for id in &tenants {
            store.purge_events(*id, cutoff).await?;
        }
        let keys_seconds = t.elapsed().as_secs_f64();
        let (bytes_after, dead) = pg.footprint().await?;
        let events = dropped.iter().map(|d| d.events).sum();
        Ok(RetentionFigure {
            method: "drop partition".into(),
            events,
            seconds,
            keys_seconds: Some(keys_seconds),
            bytes_before: Some(bytes_before),
            bytes_after: Some(bytes_after),
            dead_rows_after: Some(dead),
            met: seconds < 1.0 && !dropped.is_empty(),
        })
    } else {
        let t = Instant::now();
        let mut events = 0;
        for id in &tenants {
            events += store.purge_events(*id, cutoff).await?;
        }
        let seconds = t.elapsed().as_secs_f64();
        Ok(RetentionFigure {
            method: "delete rows".into(),
            events,
            seconds,
            keys_seconds: None,
            bytes_before: None,
            bytes_after: None,
            dead_rows_after: None,
            met: seconds < 1.0,
        })
    }
}
