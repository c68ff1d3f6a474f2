//! `picket report summary|access|dashboard`: the ReportService aggregates for
//! a calendar period (`--period daily|weekly|monthly`, the last complete one
//! unless `--at` names a time inside another) or an explicit `--from`/`--to`
//! range, printed as a table or, with `--json`, as one JSON document.

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::cli::client::ServerArgs;
use crate::grpc::convert::timestamp;
use crate::grpc::pb;
use crate::grpc::pb::report_service_client::ReportServiceClient;

/// `--period` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeriodArg {
    /// One UTC day.
    Daily,
    /// One ISO week (Monday to Monday, UTC).
    Weekly,
    /// One calendar month (UTC).
    Monthly,
}

/// The range arguments every report takes.
#[derive(Debug, Clone, clap::Args)]
pub struct RangeArgs {
    /// A calendar period: the last complete one, or the one containing `--at`.
    #[arg(long, value_enum, conflicts_with_all = ["from", "to"], required_unless_present = "from")]
    pub period: Option<PeriodArg>,
    /// With `--period`: a time inside the wanted period, RFC 3339.
    #[arg(long, requires = "period")]
    pub at: Option<DateTime<Utc>>,
    /// Start of the range (inclusive), RFC 3339, e.g. 2026-11-01T00:00:00Z.
    #[arg(long, requires = "to")]
    pub from: Option<DateTime<Utc>>,
    /// End of the range (exclusive), RFC 3339.
    #[arg(long, requires = "from")]
    pub to: Option<DateTime<Utc>>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl RangeArgs {
    fn parts(&self) -> (Option<pb::TimeRange>, i32, Option<prost_types::Timestamp>) {
        let period = match self.period {
            None => pb::ReportPeriod::Unspecified,
            Some(PeriodArg::Daily) => pb::ReportPeriod::Daily,
            Some(PeriodArg::Weekly) => pb::ReportPeriod::Weekly,
            Some(PeriodArg::Monthly) => pb::ReportPeriod::Monthly,
        };
        let range = match (self.from, self.to) {
            (Some(from), Some(to)) => Some(pb::TimeRange {
                start: Some(timestamp(from)),
                end: Some(timestamp(to)),
            }),
            _ => None,
        };
        (range, period as i32, self.at.map(timestamp))
    }
}

/// `picket report …`
#[derive(Debug, clap::Subcommand)]
pub enum ReportCommand {
    /// The security summary (ReportService.GetSecuritySummary).
    Summary(SummaryArgs),
    /// Who accessed what (ReportService.GetAccessReport), every page.
    Access(AccessArgs),
    /// Dashboard series (ReportService.GetDashboardMetrics).
    Dashboard(DashboardArgs),
}

/// `picket report summary` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub range: RangeArgs,
}

/// `picket report access` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AccessArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Group per (actor, source IP) instead of per (actor, resource, action).
    #[arg(long)]
    pub by_source_ip: bool,
    /// Only this actor.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only these event types (repeatable).
    #[arg(long = "event-type")]
    pub event_types: Vec<String>,
    /// Only resources starting with this prefix.
    #[arg(long)]
    pub resource_prefix: Option<String>,
}

/// `picket report dashboard` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Bucket width in seconds (60..604800).
    #[arg(long, default_value_t = 3600)]
    pub bucket_seconds: u32,
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

fn range_json(r: &Option<pb::TimeRange>) -> Value {
    let r = r.unwrap_or_default();
    json!({"start": time(&r.start), "end": time(&r.end)})
}

fn severities_json(s: &Option<pb::SeverityCounts>) -> Value {
    let s = s.unwrap_or_default();
    json!({"info": s.info, "low": s.low, "medium": s.medium, "high": s.high, "critical": s.critical})
}

async fn client(
    server: &ServerArgs,
) -> anyhow::Result<ReportServiceClient<tonic::transport::Channel>> {
    Ok(ReportServiceClient::new(server.channel().await?))
}

fn failed(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what} failed: {} ({:?})", s.message(), s.code())
}

/// Prints rows as left-aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Runs `picket report …`.
pub async fn run(cmd: ReportCommand) -> anyhow::Result<()> {
    match cmd {
        ReportCommand::Summary(a) => summary(a).await,
        ReportCommand::Access(a) => access(a).await,
        ReportCommand::Dashboard(a) => dashboard(a).await,
    }
}

async fn summary(a: SummaryArgs) -> anyhow::Result<()> {
    let (time_range, period, period_containing) = a.range.parts();
    let req = pb::GetSecuritySummaryRequest {
        time_range,
        period,
        period_containing,
    };
    let s = client(&a.server)
        .await?
        .get_security_summary(a.server.request(req)?)
        .await
        .map_err(|e| failed("the security summary", e))?
        .into_inner();
    let rt = |t: &Option<pb::ResponseTime>| {
        let t = t.unwrap_or_default();
        json!({"mean_seconds": t.mean_seconds, "incidents": t.incidents})
    };
    let doc = json!({
        "time_range": range_json(&s.time_range),
        "events_total": s.events_total,
        "auth_attempts": s.auth_attempts,
        "failed_logins": s.failed_logins,
        "vpn_connections": s.vpn_connections,
        "new_vpn_connections": s.new_vpn_connections,
        "firewall_rule_changes": s.firewall_rule_changes,
        "quota_violations": s.quota_violations,
        "alerts_total": s.alerts_total,
        "alerts_by_severity": severities_json(&s.alerts_by_severity),
        "alerts_by_rule": s.alerts_by_rule.iter().map(|r| json!({
            "source_name": r.source_name, "title": r.title, "count": r.count})).collect::<Vec<_>>(),
        "incidents_opened": s.incidents_opened,
        "incidents_resolved": s.incidents_resolved,
        "incidents_open": s.incidents_open,
        "time_to_acknowledge": rt(&s.time_to_acknowledge),
        "time_to_investigate": rt(&s.time_to_investigate),
        "time_to_resolve": rt(&s.time_to_resolve),
        "top_entities": s.top_entities.iter().map(|e| {
            let ent = e.entity.clone().unwrap_or_default();
            let kind = pb::EntityKind::try_from(ent.kind)
                .map(|k| k.as_str_name().trim_start_matches("ENTITY_KIND_").to_lowercase())
                .unwrap_or_default();
            json!({"kind": kind, "value": ent.value, "alert_count": e.alert_count})
        }).collect::<Vec<_>>(),
    });
    if a.range.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).context("failed to encode")?
        );
        return Ok(());
    }
    println!(
        "Security summary {} .. {}",
        doc["time_range"]["start"].as_str().unwrap_or_default(),
        doc["time_range"]["end"].as_str().unwrap_or_default()
    );
    let mut rows = Vec::new();
    for key in [
        "events_total",
        "auth_attempts",
        "failed_logins",
        "vpn_connections",
        "new_vpn_connections",
        "firewall_rule_changes",
        "quota_violations",
        "alerts_total",
        "incidents_opened",
        "incidents_resolved",
        "incidents_open",
    ] {
        rows.push(vec![key.to_owned(), doc[key].to_string()]);
    }
    for level in ["info", "low", "medium", "high", "critical"] {
        rows.push(vec![
            format!("alerts_{level}"),
            doc["alerts_by_severity"][level].to_string(),
        ]);
    }
    for key in [
        "time_to_acknowledge",
        "time_to_investigate",
        "time_to_resolve",
    ] {
        rows.push(vec![
            format!("{key}_seconds"),
            format!(
                "{:.1} (over {} incidents)",
                doc[key]["mean_seconds"].as_f64().unwrap_or(0.0),
                doc[key]["incidents"]
            ),
        ]);
    }
    table(&["figure", "value"], &rows);
    if !s.alerts_by_rule.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .alerts_by_rule
            .iter()
            .map(|r| vec![r.count.to_string(), r.source_name.clone(), r.title.clone()])
            .collect();
        table(&["alerts", "source", "title"], &rows);
    }
    if let Some(list) = doc["top_entities"].as_array().filter(|l| !l.is_empty()) {
        println!();
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|e| {
                vec![
                    e["alert_count"].to_string(),
                    e["kind"].as_str().unwrap_or_default().to_owned(),
                    e["value"].as_str().unwrap_or_default().to_owned(),
                ]
            })
            .collect();
        table(&["alerts", "kind", "entity"], &rows);
    }
    Ok(())
}

async fn access(a: AccessArgs) -> anyhow::Result<()> {
    let (time_range, period, period_containing) = a.range.parts();
    let mut c = client(&a.server).await?;
    let group_by = if a.by_source_ip {
        pb::AccessGrouping::ActorSourceIp
    } else {
        pb::AccessGrouping::ActorResourceAction
    };
    let mut rows = Vec::new();
    let mut token = String::new();
    let mut covered = None;
    // At most 1,000 pages of 1,000 rows: a million groups is a report to
    // narrow with filters, not to print.
    for _ in 0..1000 {
        let req = pb::GetAccessReportRequest {
            time_range,
            period,
            period_containing,
            group_by: group_by as i32,
            actor: a.actor.clone().unwrap_or_default(),
            event_types: a.event_types.clone(),
            resource_prefix: a.resource_prefix.clone().unwrap_or_default(),
            page_size: 1000,
            page_token: token,
        };
        let page = c
            .get_access_report(a.server.request(req)?)
            .await
            .map_err(|e| failed("the access report", e))?
            .into_inner();
        covered = page.time_range;
        rows.extend(page.rows);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    if !token.is_empty() {
        bail!("the access report has more than 1,000,000 rows; narrow it with filters");
    }
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut o = json!({"actor": r.actor, "count": r.count, "failures": r.failures,
                "first_seen": time(&r.first_seen), "last_seen": time(&r.last_seen),
                "distinct_resources": r.distinct_resources,
                "distinct_source_ips": r.distinct_source_ips});
            if a.by_source_ip {
                o["source_ip"] = json!(r.source_ip);
            } else {
                o["resource"] = json!(r.resource);
                o["action"] = json!(r.action);
            }
            o
        })
        .collect();
    if a.range.json {
        let doc = json!({"time_range": range_json(&covered), "rows": json_rows});
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).context("failed to encode")?
        );
        return Ok(());
    }
    let r = range_json(&covered);
    println!(
        "Access report {} .. {}",
        r["start"].as_str().unwrap_or_default(),
        r["end"].as_str().unwrap_or_default()
    );
    let (header, cells): (&[&str], RowCells) = if a.by_source_ip {
        (
            &[
                "actor",
                "source_ip",
                "count",
                "failures",
                "resources",
                "first_seen",
                "last_seen",
            ],
            ip_cells,
        )
    } else {
        (
            &[
                "actor",
                "resource",
                "action",
                "count",
                "failures",
                "source_ips",
                "first_seen",
                "last_seen",
            ],
            resource_cells,
        )
    };
    let rows: Vec<Vec<String>> = rows.iter().map(cells).collect();
    table(header, &rows);
    Ok(())
}

/// The table cells of one access report row.
type RowCells = fn(&pb::AccessReportRow) -> Vec<String>;

fn ip_cells(r: &pb::AccessReportRow) -> Vec<String> {
    vec![
        r.actor.clone(),
        r.source_ip.clone(),
        r.count.to_string(),
        r.failures.to_string(),
        r.distinct_resources.to_string(),
        time(&r.first_seen),
        time(&r.last_seen),
    ]
}

fn resource_cells(r: &pb::AccessReportRow) -> Vec<String> {
    vec![
        r.actor.clone(),
        r.resource.clone(),
        r.action.clone(),
        r.count.to_string(),
        r.failures.to_string(),
        r.distinct_source_ips.to_string(),
        time(&r.first_seen),
        time(&r.last_seen),
    ]
}

async fn dashboard(a: DashboardArgs) -> anyhow::Result<()> {
    let (time_range, period, period_containing) = a.range.parts();
    let req = pb::GetDashboardMetricsRequest {
        time_range,
        period,
        period_containing,
        bucket_seconds: a.bucket_seconds,
    };
    let m = client(&a.server)
        .await?
        .get_dashboard_metrics(a.server.request(req)?)
        .await
        .map_err(|e| failed("the dashboard metrics", e))?
        .into_inner();
    if a.range.json {
        let buckets: Vec<Value> = m
            .buckets
            .iter()
            .map(|b| {
                json!({
                    "start": time(&b.start), "end": time(&b.end), "events": b.events,
                    "events_by_severity": severities_json(&b.events_by_severity),
                    "auth_attempts": b.auth_attempts, "auth_successes": b.auth_successes,
                    "auth_success_rate": b.auth_success_rate, "failed_logins": b.failed_logins,
                    "api_calls": b.api_calls, "firewall_rule_changes": b.firewall_rule_changes,
                    "vpn_connects": b.vpn_connects, "vpn_disconnects": b.vpn_disconnects,
                    "active_vpn_connections": b.active_vpn_connections,
                    "alerts": b.alerts, "alerts_by_severity": severities_json(&b.alerts_by_severity),
                    "incidents": b.incidents,
                    "incidents_by_severity": severities_json(&b.incidents_by_severity),
                    "unresolved_critical_alerts": b.unresolved_critical_alerts,
                })
            })
            .collect();
        let doc = json!({"time_range": range_json(&m.time_range),
            "bucket_seconds": m.bucket_seconds, "buckets": buckets});
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).context("failed to encode")?
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = m
        .buckets
        .iter()
        .map(|b| {
            vec![
                time(&b.start),
                b.events.to_string(),
                b.auth_attempts.to_string(),
                format!("{:.2}", b.auth_success_rate),
                b.failed_logins.to_string(),
                b.api_calls.to_string(),
                b.firewall_rule_changes.to_string(),
                b.active_vpn_connections.to_string(),
                b.alerts.to_string(),
                b.incidents.to_string(),
                b.unresolved_critical_alerts.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "bucket_start",
            "events",
            "auth",
            "auth_ok",
            "failed_logins",
            "api_calls",
            "fw_changes",
            "vpn_active",
            "alerts",
            "incidents",
            "open_critical",
        ],
        &rows,
    );
    Ok(())
}
