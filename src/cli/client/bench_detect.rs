//! `picket bench detect`: detection latency. It starts a server over the given
//! database in this process (port 0, detection on), creates a fresh tenant,
//! opens `AlertService.WatchAlerts`, and then, N times in turn, sends a burst
//! of failed password logins from a fresh source IP. The burst's 6th failure
//! is the one that crosses the "more than 5 failures from one IP in 5 minutes"
//! rule; the latency is from the ack of the `Ingest` call carrying it to the
//! arrival on the watch stream of an alert naming that IP.
//!
//! The in-process harness ([`InProcess`]) is shared with `picket simulate`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use secrecy::SecretString;
use serde::Serialize;
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::cli::client::{tenant_with_key, with_key};
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::grpc::pb::alert_service_client::AlertServiceClient;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;
use crate::server::config::Settings;
use crate::server::startup::Application;

/// `picket bench detect` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchDetectArgs {
    /// Database to run on (a fresh tenant is created in it). Without it, a
    /// fresh SQLite store in a temporary directory, removed afterwards: a
    /// benchmark never writes into the server's own store by default.
    #[arg(long, env = "PICKET_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Keep the temporary store (its URL is printed on stderr).
    #[arg(long)]
    pub keep_store: bool,
    /// Bursts to measure (each from its own source IP).
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Send each burst as one `Ingest` batch instead of one call per event.
    #[arg(long)]
    pub batch: bool,
    /// Give up waiting for a burst's alert after this many seconds (counted as missed).
    #[arg(long, default_value_t = 60)]
    pub timeout_seconds: u64,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,

    /// Measure detection under an ingest storm instead (see
    /// `bench_storm.rs`): `credential-stuffing` (the default), `quiet` or
    /// `fresh-ips`. Starts `picket serve` processes with detection on; with a
    /// Postgres `--database-url` (a database on the cluster it may connect
    /// to, e.g. `/postgres`) it creates a fresh database for the run and
    /// drops it afterwards.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "credential-stuffing")]
    pub storm: Option<crate::cli::client::bench_storm::StormKind>,
    /// Storm: events to send, over all tenants.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Storm: users per tenant.
    #[arg(long, default_value_t = 2_000)]
    pub users: usize,
    /// Storm: percent of events that are logins.
    #[arg(long, default_value_t = 25)]
    pub login_percent: u32,
    /// Storm: percent of logins that fail (default: 10 for credential
    /// stuffing, 1 for quiet, 20 for fresh IPs).
    #[arg(long)]
    pub fail_percent: Option<u32>,
    /// Storm: bursts of six failed logins for an administrator account sent
    /// during the storm (one account each), measured ack → alert.
    #[arg(long, default_value_t = 20)]
    pub admin_bursts: usize,
    /// Storm: tenants the events are spread over (one stream each at least).
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// Storm: HTTP/2 connections (and at least as many IngestStreams).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Storm: events per batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Storm: batches in flight per connection (one window shared by all streams).
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Storm: servers to start over the run's database (above 1 needs
    /// Postgres and `--redis-url`).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Storm: Redis for the replicas.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Storm: extra `PICKET_*=value` settings for the servers it starts.
    #[arg(long = "serve-env", value_name = "NAME=VALUE")]
    pub serve_env: Vec<String>,
    /// Storm: target running servers instead (`http://host:port`, repeat for
    /// several replicas); needs `--admin-token`. RSS is then not measured.
    #[arg(long = "server", value_name = "URL")]
    pub servers: Vec<String>,
    /// Storm: the operator token of the servers given with `--server`.
    #[arg(long, env = "PICKET_ADMIN_TOKEN", hide_env_values = true, value_parser = secret)]
    pub admin_token: Option<SecretString>,
    /// Storm: give up waiting for detection to finish this long after the last ack.
    #[arg(long, default_value_t = 600)]
    pub drain_timeout_seconds: u64,
}

fn secret(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s.to_owned()))
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct DetectReport {
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// Bursts sent.
    pub iterations: usize,
    /// `batch` (the burst in one call) or `single` (one call per event).
    pub mode: String,
    /// Bursts whose alert arrived.
    pub alerted: usize,
    /// Bursts whose alert did not arrive within the timeout.
    pub missed: usize,
    /// Ack of the triggering event → alert on WatchAlerts, in milliseconds,
    /// over the bursts that alerted.
    pub latency_ms: Option<crate::cli::client::bench::Latency>,
    /// The target (p99 ≤ 1,000 ms, nothing missed) was met.
    pub target_met: bool,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchDetectArgs) -> anyhow::Result<()> {
    if let Some(kind) = args.storm {
        return crate::cli::client::bench_storm::run(&args, kind).await;
    }
    let report = bench(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("backend            {}", report.backend);
    println!(
        "load               {} bursts of 6 failed logins, each from a fresh IP ({})",
        report.iterations, report.mode
    );
    println!(
        "alerted            {} of {} ({} missed)",
        report.alerted, report.iterations, report.missed
    );
    match &report.latency_ms {
        Some(l) => println!(
            "ack → alert        p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.p50, l.p99, l.max
        ),
        None => println!("ack → alert        no alert arrived"),
    }
    println!(
        "target             p99 ≤ 1000 ms, none missed: {}",
        if report.target_met { "met" } else { "MISSED" }
    );
    Ok(())
}

/// Runs the benchmark.
pub async fn bench(args: &BenchDetectArgs) -> anyhow::Result<DetectReport> {
    anyhow::ensure!(
        (1..=60_000).contains(&args.iterations),
        "--iterations must be 1..60000"
    );
    let store = RunStore::open(args.database_url.as_deref())?;
    let report = bench_on(&store.url, args).await;
    store.finish(args.keep_store);
    report
}

async fn bench_on(database_url: &str, args: &BenchDetectArgs) -> anyhow::Result<DetectReport> {
    let server = InProcess::start(database_url, "bench-detect").await?;
    let watcher = AlertWatcher::start(server.alerts(), &server.key).await?;
    let mut ingest = server.ingest();
    let timeout = Duration::from_secs(args.timeout_seconds);

    // Warm-up (not measured): the first alert also shows the pipeline has
    // finished rebuilding state for the database's existing tenants.
    let warm = burst("192.0.2.1", "warmup", 0);
    let acked = send(&mut ingest, &server.key, warm, true).await?;
    watcher
        .wait_for(
            |a| names(a, pb::EntityKind::Ip, "192.0.2.1"),
            acked,
            timeout * 3,
        )
        .await
        .context("the warm-up burst raised no alert: is detection running?")?;

    let mut latencies = Vec::with_capacity(args.iterations);
    let mut missed = 0;
    for i in 0..args.iterations {
        let ip = format!("10.77.{}.{}", i / 250, i % 250 + 1);
        let events = burst(&ip, &format!("it{i}"), i);
        let acked = if args.batch {
            send(&mut ingest, &server.key, events, true).await?
        } else {
            let mut acked = Instant::now();
            for e in events {
                acked = send(&mut ingest, &server.key, vec![e], true).await?;
            }
            acked
        };
        match watcher
            .wait_for(|a| names(a, pb::EntityKind::Ip, &ip), acked, timeout)
            .await
        {
            Some(arrived) => latencies.push(arrived.saturating_duration_since(acked)),
            None => missed += 1,
        }
    }
    let backend = server.backend.clone();
    server.stop().await?;
    let latency_ms = crate::cli::client::bench::percentiles(&latencies);
    let target_met = missed == 0 && latency_ms.as_ref().is_some_and(|l| l.p99 <= 1000.0);
    Ok(DetectReport {
        backend,
        iterations: args.iterations,
        mode: if args.batch { "batch" } else { "single" }.into(),
        alerted: latencies.len(),
        missed,
        latency_ms,
        target_met,
    })
}

/// Six failed password logins from `ip` for one account, now.
fn burst(ip: &str, tag: &str, i: usize) -> Vec<pb::Event> {
    let now = Utc::now();
    (0..6)
        .map(|n| pb::Event {
            occurred_at: Some(crate::grpc::convert::timestamp(now)),
            event_type: "user.login".into(),
            idempotency_key: format!("{tag}-{n}"),
            actor: format!("bench-user-{i}@example.com"),
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

/// Sends one `Ingest` call and returns when its ack arrived; with `strict`,
/// any rejected or duplicate event is an error.
pub(crate) async fn send(
    ingest: &mut IngestServiceClient<Channel>,
    key: &str,
    events: Vec<pb::Event>,
    strict: bool,
) -> anyhow::Result<Instant> {
    let n = events.len();
    let r = ingest
        .ingest(with_key(pb::IngestRequest { events }, key)?)
        .await
        .map_err(|s| anyhow::anyhow!("ingest failed: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let acked = Instant::now();
    if strict {
        anyhow::ensure!(
            r.accepted as usize == n,
            "{} of {n} events accepted: {:?}",
            r.accepted,
            r.receipts
                .iter()
                .find(|x| x.status != pb::ReceiptStatus::Accepted as i32)
        );
    }
    Ok(acked)
}

/// Whether `a` names the entity `(kind, value)`.
pub(crate) fn names(a: &pb::Alert, kind: pb::EntityKind, value: &str) -> bool {
    a.entities
        .iter()
        .any(|e| e.kind == kind as i32 && e.value == value)
}

/// Where `bench detect` and `simulate` run: the store given, or else a fresh
/// SQLite store in a new temporary directory (never the default store of
/// `picket serve`, so a run neither fills a developer's store with made-up
/// tenants nor meets that store's own tenants and alerts).
pub(crate) struct RunStore {
    /// The store's URL.
    pub url: String,
    /// The temporary directory holding it, if it is a fresh one.
    dir: Option<std::path::PathBuf>,
}

impl RunStore {
    /// `url`, or a fresh temporary SQLite store.
    pub fn open(url: Option<&str>) -> anyhow::Result<Self> {
        if let Some(url) = url {
            return Ok(Self {
                url: url.to_owned(),
                dir: None,
            });
        }
        let dir = std::env::temp_dir().join(format!(
            "picket-run-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 6]>())
        ));
        std::fs::create_dir(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        Ok(Self {
            url: format!("sqlite://{}", dir.join("picket.db").display()),
            dir: Some(dir),
        })
    }

    /// Ends the run: a temporary store is removed, or with `keep` left in
    /// place and its URL printed on stderr (stdout may carry JSON).
    pub fn finish(self, keep: bool) {
        let Some(dir) = self.dir else { return };
        if keep {
            eprintln!("store kept: {}", self.url);
        } else if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!(
                "could not remove the temporary store {}: {e}",
                dir.display()
            );
        }
    }
}

/// A server in this process over a database, with a fresh tenant and a key
/// (ingest + read) for it.
pub(crate) struct InProcess {
    /// Channel to the server.
    pub channel: Channel,
    /// The tenant's API key.
    pub key: String,
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// Stops the server.
    stop: tokio::sync::oneshot::Sender<()>,
    /// The server task.
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts the server (detection on, defaults otherwise) and creates a
    /// tenant named `{prefix}-{random}`.
    pub async fn start(database_url: &str, prefix: &str) -> anyhow::Result<Self> {
        Self::start_with(database_url, prefix, |_| {}).await
    }

    /// [`InProcess::start`] with `configure` applied to the server's settings
    /// (detection is on and the address and operator token are set after it).
    pub async fn start_with(
        database_url: &str,
        prefix: &str,
        configure: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        let operator = crate::access::auth::random_secret();
        let mut settings = Settings::with_database(Some(database_url));
        configure(&mut settings);
        settings.listen = "127.0.0.1:0".parse().expect("static address");
        settings.admin_token = Some(SecretString::from(operator.clone()));
        settings.detection = true;
        let app = Application::build(settings)
            .await
            .context("failed to start the server")?;
        let backend = app.store().backend().as_str().to_owned();
        let addr = app.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let run_id = hex::encode(rand::random::<[u8; 4]>());
        let mut admin = AdminServiceClient::new(channel.clone());
        let (_, key) = tenant_with_key(
            &mut admin,
            &operator,
            format!("{prefix}-{run_id}"),
            prefix,
            &[pb::Scope::Ingest, pb::Scope::Read],
        )
        .await?;
        Ok(Self {
            channel,
            key,
            backend,
            stop,
            server,
        })
    }

    /// An ingest client.
    pub fn ingest(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::new(self.channel.clone()).max_encoding_message_size(64 << 20)
    }

    /// An alert client.
    pub fn alerts(&self) -> AlertServiceClient<Channel> {
        AlertServiceClient::new(self.channel.clone())
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await.context("server panicked")?
    }
}

/// Follows `WatchAlerts` in the background and records every alert item with
/// the instant it arrived.
pub(crate) struct AlertWatcher {
    /// (arrival, alert), in arrival order.
    seen: Arc<Mutex<Vec<(Instant, pb::Alert)>>>,
    /// Notified on every alert.
    notify: Arc<Notify>,
    /// The reading task.
    task: tokio::task::JoinHandle<()>,
}

impl AlertWatcher {
    /// Opens the stream (from the current head) and starts reading it.
    pub async fn start(mut client: AlertServiceClient<Channel>, key: &str) -> anyhow::Result<Self> {
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
        let seen: Arc<Mutex<Vec<(Instant, pb::Alert)>>> = Arc::default();
        let notify = Arc::new(Notify::new());
        let task = {
            let seen = seen.clone();
            let notify = notify.clone();
            tokio::spawn(async move {
                while let Ok(Some(item)) = stream.message().await {
                    if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item {
                        seen.lock().expect("not poisoned").push((Instant::now(), a));
                        notify.notify_waiters();
                    }
                }
            })
        };
        Ok(Self { seen, notify, task })
    }

    /// The first arrival at or after `since` of an alert matching `pred`,
    /// waiting at most `timeout` past `since`.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&pb::Alert) -> bool,
        since: Instant,
        timeout: Duration,
    ) -> Option<Instant> {
        let deadline = since + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(t) = self.first(&pred, since) {
                return Some(t);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return self.first(&pred, since);
            }
        }
    }

    /// Arrival of the first alert matching `pred` that arrived at or after
    /// `since`, or (alerts can overtake their ack) up to 1 s before it.
    fn first(&self, pred: &impl Fn(&pb::Alert) -> bool, since: Instant) -> Option<Instant> {
        let early = since.checked_sub(Duration::from_secs(1)).unwrap_or(since);
        self.seen
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|(t, a)| *t >= early && pred(a))
            .map(|(t, _)| *t)
    }

    /// Every alert item seen so far.
    pub fn snapshot(&self) -> Vec<(Instant, pb::Alert)> {
        self.seen.lock().expect("not poisoned").clone()
    }

    /// Waits until `cond` holds over the alerts seen, or `deadline`.
    pub async fn wait_until(
        &self,
        cond: impl Fn(&[(Instant, pb::Alert)]) -> bool,
        deadline: Instant,
    ) -> bool {
        loop {
            let notified = self.notify.notified();
            if cond(&self.seen.lock().expect("not poisoned")) {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return cond(&self.seen.lock().expect("not poisoned"));
            }
        }
    }

    /// Distinct alerts by id (their latest state) with their first arrival.
    pub fn distinct(&self) -> Vec<(Instant, pb::Alert)> {
        let mut by_id: HashMap<String, (Instant, pb::Alert)> = HashMap::new();
        let mut order = Vec::new();
        for (t, a) in self.snapshot() {
            match by_id.get_mut(&a.id) {
                Some(slot) => slot.1 = a,
                None => {
                    order.push(a.id.clone());
                    by_id.insert(a.id.clone(), (t, a));
                }
            }
        }
        order
            .into_iter()
            .filter_map(|id| by_id.remove(&id))
            .collect()
    }
}

impl Drop for AlertWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
