//! `picket export events`: an audit export through `ReportService.ExportEvents`,
//! written as JSON lines or CSV, with a progress bar over the time range.
//! An interrupted export (server restart, network) resumes by itself from the
//! last cursor received; a failed run prints the cursor to resume with
//! `--after-cursor` (the output file is then appended to).

use std::io::Write;

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::client::{ServerArgs, is_retryable, retry_delay};
use crate::grpc::convert::timestamp;
use crate::grpc::pb;
use crate::grpc::pb::report_service_client::ReportServiceClient;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line, with the field names of `picket.v1.Event`.
    Jsonl,
    /// RFC 4180 CSV with a header row: the event's top-level fields; a value
    /// a spreadsheet would evaluate as a formula is prefixed with `'`.
    Csv,
}

/// `picket export events` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportEventsArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Start of the range on occurred_at (inclusive), RFC 3339, e.g. 2026-11-01T00:00:00Z.
    #[arg(long)]
    pub from: DateTime<Utc>,
    /// End of the range (exclusive), RFC 3339.
    #[arg(long)]
    pub to: DateTime<Utc>,
    /// Output format.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// Write to this file instead of standard output (appended to when resuming).
    #[arg(long, short)]
    pub output: Option<std::path::PathBuf>,
    /// Only these event types (repeatable).
    #[arg(long = "event-type")]
    pub event_types: Vec<String>,
    /// Only this actor.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this source IP.
    #[arg(long)]
    pub source_ip: Option<String>,
    /// Only resources starting with this prefix.
    #[arg(long)]
    pub resource_prefix: Option<String>,
    /// Only failures.
    #[arg(long)]
    pub failures: bool,
    /// Resume after this cursor (printed by an interrupted run).
    #[arg(long)]
    pub after_cursor: Option<String>,
    /// Give up after this many consecutive failed attempts.
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Events per ExportEvents message asked of the server: batches spare the
/// per-message work on both sides; the cursor of a batch resumes after its
/// last event, and a batch is written whole before its cursor is kept.
const EVENTS_PER_MESSAGE: u32 = 500;

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 15] = [
    "id",
    "occurred_at",
    "received_at",
    "event_type",
    "actor",
    "action",
    "resource",
    "outcome",
    "severity",
    "source_ip",
    "destination_ip",
    "source_system",
    "service",
    "environment",
    "ocsf_class_uid",
];

fn time(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

fn outcome(v: i32) -> String {
    pb::Outcome::try_from(v)
        .map(|o| {
            o.as_str_name()
                .trim_start_matches("OUTCOME_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

fn severity(v: i32) -> String {
    pb::Severity::try_from(v)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SEVERITY_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

/// One field for CSV: a value a spreadsheet would evaluate as a formula
/// (starting with `=`, `+`, `-`, `@`, a tab or a carriage return; event fields
/// are attacker-controlled text, e.g. an actor name `=HYPERLINK(…)`) gets a
/// leading `'` (OWASP's advice against CSV injection), then the field is quoted
/// when it needs to be (RFC 4180). JSON lines keep every value byte for byte.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// An event as one CSV row (no line break).
pub fn csv_row(e: &pb::Event) -> String {
    let fields = [
        e.id.clone(),
        time(e.occurred_at),
        time(e.received_at),
        e.event_type.clone(),
        e.actor.clone(),
        e.action.clone(),
        e.resource.clone(),
        outcome(e.outcome),
        severity(e.severity),
        e.source_ip.clone(),
        e.destination_ip.clone(),
        e.source_system.clone(),
        e.service.clone(),
        e.environment.clone(),
        e.ocsf_class_uid.to_string(),
    ];
    fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",")
}

/// An event as one JSON object: the field names of `picket.v1.Event`, times in
/// RFC 3339, enums as short lower-case names, unset details left out.
pub fn json_line(e: &pb::Event) -> serde_json::Result<String> {
    use serde_json::json;
    let mut v = json!({
        "id": e.id,
        "occurred_at": time(e.occurred_at),
        "received_at": time(e.received_at),
        "event_type": e.event_type,
        "idempotency_key": e.idempotency_key,
        "actor": e.actor,
        "action": e.action,
        "resource": e.resource,
        "outcome": outcome(e.outcome),
        "severity": severity(e.severity),
        "source_ip": e.source_ip,
        "destination_ip": e.destination_ip,
        "source_system": e.source_system,
        "service": e.service,
        "environment": e.environment,
        "attributes": e.attributes.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "ocsf_class_uid": e.ocsf_class_uid,
        "ocsf_category_uid": e.ocsf_category_uid,
    });
    let obj = v.as_object_mut().expect("an object");
    if let Some(h) = &e.http {
        obj.insert(
            "http".into(),
            json!({"method": h.method, "path": h.path, "status_code": h.status_code,
                "latency_ms": h.latency_ms, "bytes_in": h.bytes_in, "bytes_out": h.bytes_out,
                "user_agent": h.user_agent, "route": h.route}),
        );
    }
    if let Some(a) = &e.auth {
        obj.insert(
            "auth".into(),
            json!({"method": a.method, "mfa_used": a.mfa_used, "mfa_method": a.mfa_method,
                "failure_reason": a.failure_reason, "session_id": a.session_id}),
        );
    }
    if let Some(n) = &e.network {
        obj.insert(
            "network".into(),
            json!({"source_port": n.source_port, "destination_port": n.destination_port,
                "protocol": n.protocol, "bytes_sent": n.bytes_sent,
                "bytes_received": n.bytes_received, "device": n.device, "rule_id": n.rule_id}),
        );
    }
    if let Some(d) = &e.database {
        obj.insert(
            "database".into(),
            json!({"system": d.system, "database": d.database, "db_user": d.db_user,
                "operation": d.operation, "rows": d.rows}),
        );
    }
    if let Some(c) = &e.change {
        obj.insert(
            "change".into(),
            json!({"object_type": c.object_type, "object_id": c.object_id,
                "old_value": c.old_value, "new_value": c.new_value,
                "privilege": c.privilege, "target_actor": c.target_actor}),
        );
    }
    if let Some(q) = &e.quota {
        obj.insert(
            "quota".into(),
            json!({"limit_name": q.limit_name, "limit": q.limit, "observed": q.observed,
                "throttled": q.throttled}),
        );
    }
    serde_json::to_string(&v)
}

/// Runs the export; returns the number of events written.
pub async fn run(args: ExportEventsArgs) -> anyhow::Result<u64> {
    if args.to <= args.from {
        bail!("--to must be after --from");
    }
    let resuming = args.after_cursor.is_some();
    let mut out: Box<dyn Write + Send> = match &args.output {
        None => Box::new(std::io::stdout()),
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(resuming)
                .truncate(!resuming)
                .open(path)
                .with_context(|| format!("failed to open {}", path.display()))?,
        ),
    };
    let mut out = std::io::BufWriter::new(&mut out);
    if args.format == Format::Csv && !resuming {
        writeln!(out, "{}", CSV_COLUMNS.join(",")).context("failed to write the output")?;
    }
    let span = (args.to - args.from).num_seconds().max(1) as u64;
    let progress = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(span).with_style(
            ProgressStyle::with_template(
                "{bar:40} {percent}% of the range, {msg} [{elapsed_precise}]",
            )
            .expect("static template"),
        )
    };
    let request = |after_cursor: String| pb::ExportEventsRequest {
        time_range: Some(pb::TimeRange {
            start: Some(timestamp(args.from)),
            end: Some(timestamp(args.to)),
        }),
        filter: Some(pb::EventFilter {
            event_types: args.event_types.clone(),
            actor: args.actor.clone().unwrap_or_default(),
            source_ip: args.source_ip.clone().unwrap_or_default(),
            resource_prefix: args.resource_prefix.clone().unwrap_or_default(),
            outcome: if args.failures {
                pb::Outcome::Failure as i32
            } else {
                0
            },
            ..Default::default()
        }),
        after_cursor,
        max_events_per_message: EVENTS_PER_MESSAGE,
    };
    let mut cursor = args.after_cursor.clone().unwrap_or_default();
    let mut written = 0u64;
    let mut failures = 0u32;
    loop {
        let attempt: Result<(), tonic::Status> = async {
            let mut client = ReportServiceClient::new(
                args.server
                    .channel()
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?,
            );
            let req = args
                .server
                .request(request(cursor.clone()))
                .map_err(|e| tonic::Status::invalid_argument(format!("{e:#}")))?;
            let mut stream = client.export_events(req).await?.into_inner();
            while let Some(item) = stream.message().await? {
                // A batch (what this client asks for), or one event (a
                // server from before batches ignores the request's size).
                let events = item.event.into_iter().chain(item.events);
                let mut newest = None;
                for e in events {
                    match args.format {
                        Format::Jsonl => {
                            let line = json_line(&e).map_err(|err| {
                                tonic::Status::internal(format!("failed to encode an event: {err}"))
                            })?;
                            writeln!(out, "{line}")
                        }
                        Format::Csv => writeln!(out, "{}", csv_row(&e)),
                    }
                    .map_err(|err| {
                        tonic::Status::data_loss(format!("failed to write the output: {err}"))
                    })?;
                    written += 1;
                    newest = e.occurred_at.or(newest);
                }
                // The message's events are all written: resume after its last.
                cursor = item.cursor;
                failures = 0;
                if let Some(t) = newest {
                    progress.set_position((t.seconds - args.from.timestamp()).max(0) as u64);
                }
                progress.set_message(format!("{written} events"));
            }
            Ok(())
        }
        .await;
        match attempt {
            Ok(()) => break,
            Err(status) if is_retryable(&status) && failures < args.max_retries => {
                failures += 1;
                let delay = retry_delay(&status, std::time::Duration::from_secs(1));
                progress.println(format!(
                    "export interrupted ({}); resuming in {delay:?}",
                    status.message()
                ));
                tokio::time::sleep(delay).await;
            }
            Err(status) => {
                out.flush().ok();
                progress.abandon();
                if !cursor.is_empty() {
                    eprintln!("resume with: --after-cursor {cursor}");
                }
                bail!(
                    "export failed after {written} events: {} ({:?})",
                    status.message(),
                    status.code()
                );
            }
        }
    }
    out.flush().context("failed to write the output")?;
    progress.finish_and_clear();
    eprintln!("exported {written} events");
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn csv_fields_that_a_spreadsheet_would_evaluate_are_neutralised() {
        assert_eq!(csv_field("=1+1"), "'=1+1");
        assert_eq!(csv_field("+cmd"), "'+cmd");
        assert_eq!(csv_field("-2"), "'-2");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(
            csv_field("=HYPERLINK(\"http://x\",\"y\")"),
            "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\""
        );
        assert_eq!(csv_field("\tx"), "'\tx");
        assert_eq!(csv_field("alice@example.com"), "alice@example.com");
    }
}
