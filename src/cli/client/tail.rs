//! `picket tail`: follows `TailEvents` in the terminal, one line per event.

use anyhow::Context;

use crate::cli::client::ServerArgs;
use crate::grpc::pb;
use crate::grpc::pb::ingest_service_client::IngestServiceClient;
use crate::grpc::pb::tail_events_response::Item;

/// `picket tail` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub server: ServerArgs,
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
    /// Resume after this cursor (printed with --show-cursor).
    #[arg(long)]
    pub after_cursor: Option<String>,
    /// Print each event as JSON instead of a line of text.
    #[arg(long)]
    pub json: bool,
    /// Print each event's cursor, to resume from later.
    #[arg(long)]
    pub show_cursor: bool,
}

/// Runs the command until the stream ends or Ctrl-C.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let mut client = IngestServiceClient::new(args.server.channel().await?);
    let request = pb::TailEventsRequest {
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
        options: Some(pb::WatchOptions {
            after_cursor: args.after_cursor.clone().unwrap_or_default(),
            heartbeat_interval_seconds: 0,
        }),
    };
    let mut stream = client
        .tail_events(args.server.request(request)?)
        .await
        .map_err(|s| anyhow::anyhow!("tail refused: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    loop {
        let item = tokio::select! {
            item = stream.message() => item.map_err(|s| anyhow::anyhow!("tail ended: {} ({:?})", s.message(), s.code()))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(item) = item else { return Ok(()) };
        if let Some(Item::Event(e)) = item.item {
            if args.json {
                println!("{}", event_json(&e).context("failed to encode an event")?);
            } else {
                let when = e
                    .occurred_at
                    .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                    .unwrap_or_default();
                let outcome = pb::Outcome::try_from(e.outcome)
                    .map(|o| {
                        o.as_str_name()
                            .trim_start_matches("OUTCOME_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                println!(
                    "{when}  {:<22} {:<24} {:<10} {:<32} {:<8} {}",
                    e.event_type, e.actor, e.action, e.resource, outcome, e.source_ip
                );
            }
            if args.show_cursor {
                println!("  cursor {}", item.cursor);
            }
        }
    }
}

fn event_json(e: &pb::Event) -> serde_json::Result<String> {
    serde_json::to_string(&serde_json::json!({
        "id": e.id,
        "occurred_at": e.occurred_at.map(|t| t.seconds),
        "event_type": e.event_type,
        "actor": e.actor,
        "action": e.action,
        "resource": e.resource,
        "outcome": e.outcome,
        "severity": e.severity,
        "source_ip": e.source_ip,
        "service": e.service,
        "ocsf_class_uid": e.ocsf_class_uid,
    }))
}
