//! `picket bench respond`: the whole response loop, end to end. A burst of
//! failed logins → the rule pack's brute-force alert → an incident → an
//! automatic playbook run (no approval step) → a ban on a `WatchDecisions`
//! subscriber.
//!
//! It starts the real server as a child process (detection on, defaults
//! otherwise), creates a tenant, creates a playbook that bans the source IP
//! of a credential-access incident of high severity with no approval step,
//! and opens one `WatchDecisions` subscriber. Then, one after the other, it
//! sends N bursts, each from its own address and account (so each is its own
//! incident): failed logins one `Ingest` call each, and measures from the
//! acknowledgement of the burst's last failed login to the arrival of the
//! ban for that address on the subscriber. The next burst starts a pause
//! after the ban arrived (or after a timeout, counted as missed).
//!
//! Afterwards it reads, for every ban, the decision, its run, the run's
//! incident and the incident's alerts, and reports where the time went (the
//! server's timestamps against the client's clock: the bench and the server
//! share the machine). It also checks every address was banned exactly once:
//! one ADDED delta on the stream and one decision in the list.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::cli::client::bench_detect::RunStore;
use crate::cli::client::serve_child::ServerChild;
use crate::cli::client::{tenant_with_key, with_key};
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;
use crate::grpc::pb::enforcement_service_client::EnforcementServiceClient;
use crate::grpc::pb::incident_service_client::IncidentServiceClient;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;
use crate::grpc::pb::playbook_service_client::PlaybookServiceClient;

/// The end-to-end target of issue 13, in milliseconds.
const TARGET_P99_MS: f64 = 1000.0;
/// Name of the playbook the bench creates.
const PLAYBOOK: &str = "bench-ban-brute-force";

/// `picket bench respond` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchRespondArgs {
    /// Database to run on (a fresh tenant is created in it). Without it, a
    /// fresh SQLite store in a temporary directory, removed afterwards.
    #[arg(long, env = "PICKET_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Bursts to send, each from its own address and account.
    #[arg(long, default_value_t = 50)]
    pub bursts: usize,
    /// Failed logins per burst. The rule pack's brute-force rule fires on
    /// the 6th within 5 minutes, so with the default the burst's last failed
    /// login is the one that raises the alert.
    #[arg(long, default_value_t = 6)]
    pub failures: usize,
    /// Pause between a ban's arrival and the next burst, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub gap_ms: u64,
    /// How long to wait for a burst's ban before counting it missed, in
    /// seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_seconds: u64,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples_ms` (which may be negative: a
    /// stage can precede the acknowledgement it is measured from).
    fn of(samples_ms: &[f64]) -> Self {
        if samples_ms.is_empty() {
            return Self::default();
        }
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let k = (q * sorted.len() as f64).ceil() as usize;
            sorted[k.clamp(1, sorted.len()) - 1]
        };
        Self {
            count: sorted.len(),
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

/// Where the time went, each from the acknowledgement of the burst's last
/// failed login, in milliseconds (server timestamps; detection starts once
/// the event is committed, which is before its acknowledgement reaches the
/// client, so an early stage can come out slightly negative).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    /// The brute-force alert was stored (`Alert.created_at`).
    pub alert_raised: Percentiles,
    /// The incident was created (`Incident.created_at`).
    pub incident_created: Percentiles,
    /// The automatic run was created (`PlaybookRun.created_at`).
    pub run_created: Percentiles,
    /// The ban was committed (`Decision.created_at`).
    pub ban_committed: Percentiles,
    /// The run succeeded (`PlaybookRun.finished_at`).
    pub run_succeeded: Percentiles,
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct RespondReport {
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// Bursts sent.
    pub bursts: usize,
    /// Failed logins per burst.
    pub failures_per_burst: usize,
    /// Bursts whose address was banned on the subscriber.
    pub banned: usize,
    /// Bursts whose ban did not arrive within the timeout.
    pub missed: usize,
    /// ADDED deltas beyond the first for a burst's address (must be 0).
    pub duplicate_deltas: usize,
    /// Bursts whose address has other than exactly one decision in the
    /// decision list (must be 0).
    pub not_exactly_one_decision: usize,
    /// Bans whose origin is not a run of the bench's playbook (must be 0).
    pub foreign_origin: usize,
    /// Last failed login acknowledged → ban on the subscriber.
    pub end_to_end_ms: Percentiles,
    /// The same path in stages (server timestamps).
    pub stages_ms: Stages,
    /// p99 end to end ≤ 1 s, every burst banned exactly once.
    pub target_met: bool,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchRespondArgs) -> anyhow::Result<()> {
    let store = RunStore::open(args.database_url.as_deref())?;
    let report = bench(&args, &store.url).await;
    store.finish(false);
    let r = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let line = |name: &str, p: &Percentiles| {
        println!(
            "{name:<22} p50 {:>7.1} ms  p95 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  (n={})",
            p.p50, p.p95, p.p99, p.max, p.count
        );
    };
    println!("backend                {}", r.backend);
    println!(
        "bursts                 {} × {} failed logins; banned {}, missed {}, duplicate deltas {}, not exactly one decision {}, foreign origin {}",
        r.bursts,
        r.failures_per_burst,
        r.banned,
        r.missed,
        r.duplicate_deltas,
        r.not_exactly_one_decision,
        r.foreign_origin
    );
    println!("from the last failed login's ack:");
    line("  alert raised", &r.stages_ms.alert_raised);
    line("  incident created", &r.stages_ms.incident_created);
    line("  run created", &r.stages_ms.run_created);
    line("  ban committed", &r.stages_ms.ban_committed);
    line("  run succeeded", &r.stages_ms.run_succeeded);
    line("  ban on subscriber", &r.end_to_end_ms);
    println!(
        "target                 p99 ≤ 1 s end to end, every burst banned once: {}",
        if r.target_met { "met" } else { "NOT met" }
    );
    Ok(())
}

/// One delta the subscriber received.
struct Seen {
    /// The banned value.
    value: String,
    /// The effective decision's id.
    decision_id: String,
    /// When it arrived.
    at: Instant,
}

/// Burst `i`'s source address (198.18.0.0/15 is set aside for benchmarks).
fn address(i: usize) -> String {
    std::net::Ipv4Addr::from(0xc612_0000_u32 + 1 + i as u32).to_string()
}

/// A failed login by `actor` from `ip`.
fn failed_login(run: &str, burst: usize, n: usize, actor: &str, ip: &str) -> pb::Event {
    let now = Utc::now();
    pb::Event {
        occurred_at: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: now.timestamp_subsec_nanos() as i32,
        }),
        event_type: "user.login".into(),
        idempotency_key: format!("{run}-{burst}-{n}"),
        actor: actor.into(),
        action: "login".into(),
        resource: "/auth/login".into(),
        outcome: pb::Outcome::Failure as i32,
        source_ip: ip.into(),
        ..Default::default()
    }
}

/// The playbook: ban the source IP of a brute force, no approval.
fn playbook() -> pb::Playbook {
    pb::Playbook {
        name: PLAYBOOK.into(),
        description: "Ban the source IP of a brute force at once (bench).".into(),
        enabled: true,
        required_approvals: 0,
        trigger: Some(pb::PlaybookTrigger {
            min_severity: pb::Severity::High as i32,
            categories: vec!["credential_access".into()],
            rules: vec![],
        }),
        steps: vec![pb::PlaybookStep {
            name: "block-source-ip".into(),
            action: pb::ActionKind::BlockIp as i32,
            params: [
                ("ip", "{{entity.ip}}"),
                ("duration_seconds", "3600"),
                ("reason", "brute force: {{incident.title}}"),
            ]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
            requires_approval: false,
            timeout_seconds: 30,
            max_attempts: 3,
        }],
        ..Default::default()
    }
}

fn at(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    DateTime::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
}

/// Runs the benchmark against a server over `database_url`.
pub async fn bench(args: &BenchRespondArgs, database_url: &str) -> anyhow::Result<RespondReport> {
    anyhow::ensure!(
        args.bursts > 0 && args.bursts < 60_000,
        "--bursts must be 1..60000"
    );
    anyhow::ensure!(
        (6..=1000).contains(&args.failures),
        "--failures must be 6..1000 (the rule needs more than 5)"
    );
    let operator = crate::access::auth::random_secret();
    let backend = if database_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let server = ServerChild::start(database_url, &operator, &[])?;
    server.wait_leading_all_shards().await?;
    let channel: Channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))?
            .tcp_nodelay(true)
            .connect()
            .await
            .context("cannot connect to the server")?;
    let run = hex::encode(rand::random::<[u8; 4]>());
    let (_, key) = tenant_with_key(
        &mut AdminServiceClient::new(channel.clone()),
        &operator,
        format!("bench-respond-{run}"),
        "bench-respond",
        &[
            pb::Scope::Ingest,
            pb::Scope::Read,
            pb::Scope::Respond,
            pb::Scope::Admin,
        ],
    )
    .await?;
    let playbook_id = PlaybookServiceClient::new(channel.clone())
        .create_playbook(with_key(
            pb::CreatePlaybookRequest {
                playbook: Some(playbook()),
            },
            &key,
        )?)
        .await
        .context("CreatePlaybook failed")?
        .into_inner()
        .playbook
        .context("no playbook")?
        .id;

    // The subscriber, on its own connection; the bench waits for its
    // snapshot before the first burst.
    let sub_channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut stream = EnforcementServiceClient::new(sub_channel)
        .watch_decisions(with_key(
            pb::WatchDecisionsRequest {
                heartbeat_interval_seconds: 5,
                ..Default::default()
            },
            &key,
        )?)
        .await
        .context("WatchDecisions failed")?
        .into_inner();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let subscriber = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        while let Some(msg) = stream.message().await? {
            match msg.item {
                Some(pb::watch_decisions_response::Item::SnapshotComplete(_)) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Some(pb::watch_decisions_response::Item::Deltas(chunk)) => {
                    let now = Instant::now();
                    for d in chunk.deltas {
                        if d.kind != pb::DeltaKind::Added as i32 {
                            continue;
                        }
                        if let Some(e) = d.decision {
                            let _ = tx.send(Seen {
                                value: e.value,
                                decision_id: e.decision_id,
                                at: now,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("no WatchDecisions snapshot within 30 s")?
        .context("the WatchDecisions stream ended")?;

    let mut ingest = IngestServiceClient::new(channel.clone());
    // Per burst: (address, ack instant, ack wall time, the first ban seen).
    let mut acks: Vec<(String, Instant, DateTime<Utc>)> = Vec::new();
    let mut first: HashMap<String, (Instant, String)> = HashMap::new();
    let mut added: HashMap<String, usize> = HashMap::new();
    let wait = Duration::from_secs(args.timeout_seconds.max(1));
    for i in 0..args.bursts {
        let ip = address(i);
        let actor = format!("bench-respond-{i}@example.com");
        let mut acked = (Instant::now(), Utc::now());
        for n in 0..args.failures {
            ingest
                .ingest(with_key(
                    pb::IngestRequest {
                        events: vec![failed_login(&run, i, n, &actor, &ip)],
                    },
                    &key,
                )?)
                .await
                .context("Ingest failed")?;
            acked = (Instant::now(), Utc::now());
        }
        acks.push((ip.clone(), acked.0, acked.1));
        let deadline = tokio::time::Instant::now() + wait;
        while !first.contains_key(&ip) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(seen)) => {
                    *added.entry(seen.value.clone()).or_default() += 1;
                    first
                        .entry(seen.value)
                        .or_insert((seen.at, seen.decision_id));
                }
                Ok(None) => {
                    let why = match subscriber.await {
                        Ok(Err(e)) => format!("{e:#}"),
                        _ => "closed".into(),
                    };
                    anyhow::bail!("the WatchDecisions stream ended: {why}");
                }
                Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    // Late or duplicate deltas: give them a moment to arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(seen) = rx.try_recv() {
        *added.entry(seen.value.clone()).or_default() += 1;
        first
            .entry(seen.value)
            .or_insert((seen.at, seen.decision_id));
    }
    subscriber.abort();

    // Where the time went, and the exactly-once checks.
    let mut enforcement = EnforcementServiceClient::new(channel.clone());
    let mut playbooks = PlaybookServiceClient::new(channel.clone());
    let mut incidents = IncidentServiceClient::new(channel.clone());
    let mut end_to_end = Vec::new();
    let (mut alert_raised, mut incident_created, mut run_created) = (vec![], vec![], vec![]);
    let (mut ban_committed, mut run_succeeded) = (vec![], vec![]);
    let (mut banned, mut missed, mut duplicate_deltas) = (0, 0, 0);
    let (mut not_exactly_one_decision, mut foreign_origin) = (0, 0);
    let ms_after = |t: Option<DateTime<Utc>>, from: DateTime<Utc>| {
        t.map(|t| (t - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0)
    };
    for (ip, ack, ack_wall) in &acks {
        let listed = enforcement
            .list_decisions(with_key(
                pb::ListDecisionsRequest {
                    scope: pb::DecisionScope::Ip as i32,
                    value: ip.clone(),
                    include_inactive: true,
                    ..Default::default()
                },
                &key,
            )?)
            .await
            .context("ListDecisions failed")?
            .into_inner()
            .decisions;
        if listed.len() != 1 {
            not_exactly_one_decision += 1;
        }
        duplicate_deltas += added.get(ip).copied().unwrap_or(0).saturating_sub(1);
        let Some((arrived, decision_id)) = first.get(ip) else {
            missed += 1;
            continue;
        };
        banned += 1;
        end_to_end.push(arrived.saturating_duration_since(*ack).as_secs_f64() * 1000.0);
        let decision = enforcement
            .get_decision(with_key(
                pb::GetDecisionRequest {
                    decision_id: decision_id.clone(),
                },
                &key,
            )?)
            .await
            .context("GetDecision failed")?
            .into_inner()
            .decision
            .context("no decision")?;
        ban_committed.extend(ms_after(at(decision.created_at.as_ref()), *ack_wall));
        let origin = decision.origin.unwrap_or_default();
        if origin.kind != pb::DecisionOriginKind::PlaybookRun as i32 {
            foreign_origin += 1;
            continue;
        }
        let run = playbooks
            .get_playbook_run(with_key(
                pb::GetPlaybookRunRequest {
                    run_id: origin.id.clone(),
                },
                &key,
            )?)
            .await
            .context("GetPlaybookRun failed")?
            .into_inner()
            .run
            .context("no run")?;
        if run.playbook_id != playbook_id {
            foreign_origin += 1;
            continue;
        }
        run_created.extend(ms_after(at(run.created_at.as_ref()), *ack_wall));
        if run.status == pb::RunStatus::Succeeded as i32 {
            run_succeeded.extend(ms_after(at(run.finished_at.as_ref()), *ack_wall));
        }
        let got = incidents
            .get_incident(with_key(
                pb::GetIncidentRequest {
                    incident_id: run.incident_id.clone(),
                },
                &key,
            )?)
            .await
            .context("GetIncident failed")?
            .into_inner();
        let incident = got.incident.context("no incident")?;
        incident_created.extend(ms_after(at(incident.created_at.as_ref()), *ack_wall));
        alert_raised.extend(
            got.alerts
                .iter()
                .filter_map(|a| at(a.created_at.as_ref()))
                .min()
                .and_then(|t| ms_after(Some(t), *ack_wall)),
        );
    }
    let end_to_end_ms = Percentiles::of(&end_to_end);
    let target_met = missed == 0
        && duplicate_deltas == 0
        && not_exactly_one_decision == 0
        && foreign_origin == 0
        && end_to_end_ms.p99 <= TARGET_P99_MS;
    drop(server);
    Ok(RespondReport {
        backend: backend.into(),
        bursts: args.bursts,
        failures_per_burst: args.failures,
        banned,
        missed,
        duplicate_deltas,
        not_exactly_one_decision,
        foreign_origin,
        end_to_end_ms,
        stages_ms: Stages {
            alert_raised: Percentiles::of(&alert_raised),
            incident_created: Percentiles::of(&incident_created),
            run_created: Percentiles::of(&run_created),
            ban_committed: Percentiles::of(&ban_committed),
            run_succeeded: Percentiles::of(&run_succeeded),
        },
        target_met,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_in_the_benchmark_range() {
        let all: std::collections::HashSet<String> = (0..1000).map(address).collect();
        assert_eq!(all.len(), 1000);
        assert_eq!(address(0), "198.18.0.1");
        assert!(all.iter().all(|a| a.starts_with("198.18.")));
    }

    #[test]
    fn percentiles_of_samples() {
        let p = Percentiles::of(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!(p.count, 100);
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        let p = Percentiles::of(&[-2.0, 1.0]);
        assert_eq!((p.p50, p.max), (-2.0, 1.0));
        assert_eq!(Percentiles::of(&[]).count, 0);
    }
}
