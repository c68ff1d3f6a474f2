//! `picket bench enforce`: CheckAccess latency with many decisions in force.
//!
//! It starts the real server as a child process, creates a tenant and loads
//! N bans (by default 10,000: exact IPv4 and IPv6 addresses, IPv4 /24 and
//! /28 ranges, IPv6 /48 and /64 ranges, actors) through CreateDecisions,
//! then C concurrent clients call CheckAccess for a mix of requests: banned
//! addresses, addresses inside banned ranges, banned actors, and misses.
//! Every answer is checked against the verdict the bench expects (so a fast
//! wrong answer counts as a failure, not a result). It reports the
//! round-trip latency measured by the clients and the server-side latency
//! from the server's `picket_check_access_seconds` histogram (the whole
//! handler: authentication, validation, the in-memory lookup).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::client::bench::Latency;
use crate::cli::client::bench_detect::RunStore;
use crate::cli::client::bench_fanout::{ServerChild, http_get, tenant_key};
use crate::cli::client::with_key;
use crate::grpc::pb;
use crate::grpc::pb::enforcement_service_client::EnforcementServiceClient;

/// `picket bench enforce` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchEnforceArgs {
    /// Database to run on (a fresh tenant is created in it). Without it, a
    /// fresh SQLite store in a temporary directory, removed afterwards.
    #[arg(long, env = "PICKET_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Bans in force during the run (a multiple of 20 is exact).
    #[arg(long, default_value_t = 10_000)]
    pub decisions: usize,
    /// CheckAccess calls to make.
    #[arg(long, default_value_t = 200_000)]
    pub checks: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// HTTP/2 connections they share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Print a machine-readable JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Server-side latency, from the server's histogram.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSide {
    /// Calls the histogram counted during the run.
    pub count: u64,
    /// Mean, in milliseconds.
    pub mean_ms: f64,
    /// The smallest bucket bound holding 50 % of the calls, in milliseconds.
    pub p50_at_most_ms: f64,
    /// The smallest bucket bound holding 99 % of the calls, in milliseconds.
    pub p99_at_most_ms: f64,
    /// Share of calls that took at most 1 ms.
    pub share_within_1ms: f64,
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct EnforceReport {
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// Bans in force.
    pub decisions: usize,
    /// Calls made.
    pub checks: usize,
    /// Concurrent callers.
    pub concurrency: usize,
    /// Calls per second over the run.
    pub checks_per_second: f64,
    /// Client-measured round trip, in milliseconds.
    pub round_trip_ms: Latency,
    /// Server-side time.
    pub server: ServerSide,
    /// Answers that differed from the expected verdict (must be 0).
    pub wrong_verdicts: usize,
    /// Time to load the decisions, in seconds.
    pub load_seconds: f64,
    /// Target met: server-side p99 ≤ 1 ms and no wrong verdict.
    pub target_met: bool,
}

/// Runs the benchmark and prints the report.
pub async fn run(args: BenchEnforceArgs) -> anyhow::Result<()> {
    let store = RunStore::open(args.database_url.as_deref())?;
    let report = bench(&args, &store.url).await;
    store.finish(false);
    let r = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("backend            {}", r.backend);
    println!(
        "load               {} bans in force (loaded in {:.1} s); {} CheckAccess calls from {} callers",
        r.decisions, r.load_seconds, r.checks, r.concurrency
    );
    println!(
        "throughput         {:.0} checks/s; wrong verdicts {}",
        r.checks_per_second, r.wrong_verdicts
    );
    println!(
        "round trip         p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        r.round_trip_ms.p50, r.round_trip_ms.p99, r.round_trip_ms.max
    );
    println!(
        "server side        mean {:.3} ms  p50 ≤ {} ms  p99 ≤ {} ms  ({:.2} % within 1 ms)",
        r.server.mean_ms,
        r.server.p50_at_most_ms,
        r.server.p99_at_most_ms,
        r.server.share_within_1ms * 100.0
    );
    println!(
        "target             server-side p99 ≤ 1 ms at {} decisions, every verdict right: {}",
        r.decisions,
        if r.target_met { "met" } else { "NOT met" }
    );
    Ok(())
}

/// The bans: `n` of them, 6 in 20 exact IPv4, 2 in 20 exact IPv6, 3 in 20
/// IPv4 /24, 1 in 20 IPv4 /28, 1 in 20 IPv6 /48, 1 in 20 IPv6 /64, 6 in 20
/// actors. Item `i` of each family is derived from `i`.
fn decisions(n: usize) -> Vec<pb::NewDecision> {
    let per = n / 20;
    let ban = |scope: pb::DecisionScope, value: String| pb::NewDecision {
        scope: scope as i32,
        value,
        r#type: pb::DecisionType::Ban as i32,
        duration_seconds: 86_400,
        reason: "bench".into(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..per * 6 {
        out.push(ban(pb::DecisionScope::Ip, v4_exact(i).to_string()));
    }
    for i in 0..per * 2 {
        out.push(ban(pb::DecisionScope::Ip, v6_exact(i).to_string()));
    }
    for i in 0..per * 3 {
        out.push(ban(
            pb::DecisionScope::Cidr,
            format!("{}/24", v4_range24(i, 0)),
        ));
    }
    for i in 0..per {
        out.push(ban(
            pb::DecisionScope::Cidr,
            format!("{}/28", v4_range28(i, 0)),
        ));
    }
    for i in 0..per {
        out.push(ban(
            pb::DecisionScope::Cidr,
            format!("{}/48", v6_range48(i, 0)),
        ));
    }
    for i in 0..per {
        out.push(ban(
            pb::DecisionScope::Cidr,
            format!("{}/64", v6_range64(i, 0)),
        ));
    }
    for i in 0..per * 6 {
        out.push(ban(pb::DecisionScope::Actor, actor(i)));
    }
    out
}

fn v4_exact(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0b00_0000 + i as u32)
}
fn v6_exact(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(0x2001_0db8_0001_u128 << 80 | i as u128)
}
fn v4_range24(i: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::from(0x0c00_0000 + ((i as u32) << 8) + u32::from(host))
}
fn v4_range28(i: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::from(0x0d00_0000 + ((i as u32) << 4) + u32::from(host & 0x0f))
}
fn v6_range48(i: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::from((0x2001_0db9_u128 << 96) | ((i as u128) << 80) | u128::from(host))
}
fn v6_range64(i: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::from((0x2001_0dba_u128 << 96) | ((i as u128) << 64) | u128::from(host))
}
fn actor(i: usize) -> String {
    format!("user-{i}@example.com")
}

/// Request `k` of the run (deterministic) and whether it should be denied.
fn request(k: usize, decisions: usize) -> (pb::CheckAccessRequest, bool) {
    let per = (decisions / 20).max(1);
    // A cheap mix of k's bits so families and items interleave.
    let h = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
    let pick = |n: usize| (h as usize / 8) % n.max(1);
    let (ip, actor_name, deny) = match h % 8 {
        0 => (v4_exact(pick(per * 6)).to_string(), String::new(), true),
        1 => (v6_exact(pick(per * 2)).to_string(), String::new(), true),
        2 => (
            v4_range24(pick(per * 3), (h >> 40) as u8).to_string(),
            String::new(),
            true,
        ),
        3 => (
            v4_range28(pick(per), (h >> 40) as u8).to_string(),
            String::new(),
            true,
        ),
        4 => (
            v6_range48(pick(per), (h >> 40) as u16).to_string(),
            String::new(),
            true,
        ),
        5 => ("192.0.2.1".into(), actor(pick(per * 6)), true),
        6 => (
            Ipv4Addr::from(0x0e00_0000 + pick(1 << 20) as u32).to_string(),
            String::new(),
            false,
        ),
        _ => (
            Ipv6Addr::from((0x2001_0dbb_u128 << 96) | pick(1 << 20) as u128).to_string(),
            format!("nobody-{}", pick(1000)),
            false,
        ),
    };
    (
        pb::CheckAccessRequest {
            ip,
            actor: actor_name,
        },
        deny,
    )
}

/// The server's `picket_check_access_seconds` histogram: (bucket bounds
/// with cumulative counts, sum, count).
async fn server_histogram(addr: &str) -> anyhow::Result<(Vec<(f64, u64)>, f64, u64)> {
    let text = http_get(addr, "/metrics").await?;
    let mut buckets = Vec::new();
    let (mut sum, mut count) = (0.0, 0);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("picket_check_access_seconds_bucket{le=\"") {
            let (le, n) = rest.split_once("\"} ").context("malformed bucket line")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            buckets.push((le, n.trim().parse()?));
        } else if let Some(v) = line.strip_prefix("picket_check_access_seconds_sum ") {
            sum = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("picket_check_access_seconds_count ") {
            count = v.trim().parse()?;
        }
    }
    Ok((buckets, sum, count))
}

/// Runs the benchmark against a server over `database_url`.
pub async fn bench(args: &BenchEnforceArgs, database_url: &str) -> anyhow::Result<EnforceReport> {
    anyhow::ensure!(args.decisions >= 20, "--decisions must be at least 20");
    anyhow::ensure!(
        args.checks > 0 && args.concurrency > 0,
        "nothing to measure"
    );
    let operator = crate::access::auth::random_secret();
    let backend = if database_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let server = ServerChild::start(database_url, &operator, None)?;
    let connect = || async {
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))?
            .tcp_nodelay(true)
            .connect()
            .await
            .context("cannot connect to the server")
    };
    let control = connect().await?;
    let key = tenant_key(&control, &operator).await?;
    let mut client = EnforcementServiceClient::new(control.clone());
    let all = decisions(args.decisions);
    let loading = Instant::now();
    for chunk in all.chunks(1000) {
        client
            .create_decisions(with_key(
                pb::CreateDecisionsRequest {
                    decisions: chunk.to_vec(),
                },
                &key,
            )?)
            .await
            .context("CreateDecisions failed")?;
    }
    let load_seconds = loading.elapsed().as_secs_f64();
    // The first call loads the tenant's index; it is not measured.
    let (warm, _) = request(0, args.decisions);
    client.check_access(with_key(warm, &key)?).await?;
    let (before, sum0, count0) = server_histogram(&server.addr).await?;

    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect().await?);
    }
    let next = Arc::new(AtomicUsize::new(1));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let mut client = EnforcementServiceClient::new(channels[c % channels.len()].clone());
        let (next, key) = (next.clone(), key.clone());
        let (checks, decisions) = (args.checks, args.decisions);
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
            let mut wrong = 0usize;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k > checks {
                    return Ok::<_, anyhow::Error>((hist, wrong));
                }
                let (req, deny) = request(k, decisions);
                let sent = Instant::now();
                let answer = client
                    .check_access(with_key(req, &key)?)
                    .await?
                    .into_inner();
                hist.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                let denied = answer.verdict == pb::Verdict::Deny as i32;
                if denied != deny {
                    wrong += 1;
                }
            }
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
    let mut wrong_verdicts = 0;
    for t in tasks {
        let (h, w) = t.await??;
        hist.add(&h).expect("same bounds");
        wrong_verdicts += w;
    }
    let elapsed = started.elapsed();
    let (after, sum1, count1) = server_histogram(&server.addr).await?;
    let count = count1.saturating_sub(count0);
    let within = |q: f64| -> f64 {
        let want = (count as f64 * q).ceil() as u64;
        after
            .iter()
            .zip(before.iter().map(|b| b.1).chain(std::iter::repeat(0)))
            .find(|((_, n), b)| n.saturating_sub(*b) >= want)
            .map_or(f64::INFINITY, |((le, _), _)| le * 1000.0)
    };
    let share_within_1ms = after
        .iter()
        .zip(before.iter().map(|b| b.1).chain(std::iter::repeat(0)))
        .find(|((le, _), _)| (*le - 0.001).abs() < 1e-12)
        .map_or(0.0, |((_, n), b)| {
            n.saturating_sub(b) as f64 / count.max(1) as f64
        });
    let server = ServerSide {
        count,
        mean_ms: (sum1 - sum0) * 1000.0 / count.max(1) as f64,
        p50_at_most_ms: within(0.5),
        p99_at_most_ms: within(0.99),
        share_within_1ms,
    };
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(EnforceReport {
        backend: backend.into(),
        decisions: all.len(),
        checks: args.checks,
        concurrency: args.concurrency,
        checks_per_second: args.checks as f64 / elapsed.as_secs_f64(),
        round_trip_ms: Latency {
            p50: ms(hist.value_at_quantile(0.5)),
            p99: ms(hist.value_at_quantile(0.99)),
            max: ms(hist.max()),
        },
        target_met: server.p99_at_most_ms <= 1.0 && wrong_verdicts == 0,
        server,
        wrong_verdicts,
        load_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_hit_what_the_decisions_ban() {
        use std::collections::HashSet;
        use std::net::IpAddr;
        let all = decisions(200);
        assert_eq!(all.len(), 200);
        let values: HashSet<String> = all.iter().map(|d| d.value.clone()).collect();
        assert_eq!(values.len(), 200, "every ban has its own target");
        let ranges: Vec<crate::domain::decision::Cidr> = all
            .iter()
            .filter(|d| d.scope == pb::DecisionScope::Cidr as i32)
            .map(|d| crate::domain::decision::Cidr::parse(&d.value, "v").unwrap())
            .collect();
        for k in 0..2000 {
            let (req, deny) = request(k, 200);
            let ip: IpAddr = req.ip.parse().unwrap();
            let hit = values.contains(&req.ip)
                || values.contains(&req.actor)
                || ranges.iter().any(|r| r.contains(ip));
            assert_eq!(hit, deny, "request {k}: {req:?}");
        }
    }
}
