//! Logs (tracing, human or JSON) and metrics (Prometheus text on `/metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, with structured fields.
    Json,
}

/// Installs the global tracing subscriber writing to stderr. `filter` uses
/// `EnvFilter` syntax (e.g. `info,picket=debug`). Human lines are coloured
/// only when stderr is a terminal, so logs written to a file or a pipe carry
/// no ANSI escape codes.
pub fn init_tracing(format: LogFormat, filter: &str) {
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init (several servers in one test process) keeps the first.
    let _ = result;
}

/// Latency buckets in seconds, for every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `picket_check_access_seconds`, finer below a millisecond (its target).
const CHECK_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
    0.25, 1.0,
];

/// The process-wide Prometheus recorder, installed on first use. One process
/// has one metrics registry, so servers started by tests share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full("picket_check_access_seconds".into()),
                    CHECK_BUCKETS,
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then ours renders nothing extra.
            let _ = metrics::set_global_recorder(recorder);
            describe_metrics();
            handle
        })
        .clone()
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "picket_grpc_requests_total",
        "gRPC calls received, by method and final status code"
    );
    describe_histogram!(
        "picket_grpc_request_duration_seconds",
        Unit::Seconds,
        "Time from receiving a gRPC call to sending its response headers"
    );
    describe_counter!(
        "picket_grpc_errors_total",
        "gRPC errors returned, by status code"
    );
    describe_counter!(
        "picket_auth_failures_total",
        "Rejected credentials, by reason"
    );
    describe_counter!(
        "picket_http_requests_total",
        "Plain HTTP requests (healthz, metrics, webhooks), by route and status"
    );
    describe_gauge!(
        "picket_store_up",
        "1 while the store answers (checked every second), 0 while it cannot be reached (grpc health is then NOT_SERVING)"
    );
    describe_gauge!(
        "picket_up",
        "1 while the server is serving, 0 while it shuts down"
    );
    describe_gauge!(
        "picket_detect_lag_seconds",
        Unit::Seconds,
        "How far detection is behind ingest: while events wait to be evaluated, the time since the oldest was received; otherwise how long the newest evaluated event waited"
    );
    describe_histogram!(
        "picket_detect_pass_duration_seconds",
        Unit::Seconds,
        "Time detection spends on one pass over a tenant's new events (reading the feed, evaluating, queueing alerts); its sum is detection's busy time"
    );
    describe_counter!(
        "picket_store_connect_retries_total",
        "Attempts at start to reach a Postgres server that could not be reached, retried within --database-wait-seconds"
    );
    describe_counter!(
        "picket_detect_rereads_total",
        "Re-reads of a tenant's feed scheduled because events the ingest hand-off announced were not readable yet (Postgres shows a commit once every older transaction has ended)"
    );
    describe_counter!(
        "picket_detect_reread_abandoned_total",
        "Times re-reading gave up on announced events within the poll interval and left them to the next poll"
    );
    describe_histogram!(
        "picket_alert_write_duration_seconds",
        Unit::Seconds,
        "Time the alert writer takes to raise one tenant's share of a batch (evidence read and alert transaction)"
    );
    describe_histogram!(
        "picket_incident_correlation_duration_seconds",
        Unit::Seconds,
        "Time the alert writer takes to correlate one tenant's new alerts of a batch into incidents"
    );
    describe_counter!(
        "picket_alert_queue_full_total",
        "Times evaluation found the alert queue full and waited for the writer"
    );
    describe_gauge!(
        "picket_alert_queue_depth",
        "Detections waiting for the alert writer (bounded; evaluation waits when it is full)"
    );
    describe_gauge!(
        "picket_watch_streams_open",
        "Open watch and tail streams, by stream"
    );
    describe_gauge!(
        "picket_watch_hubs",
        "Shared feed readers (one per stream and tenant with subscribers)"
    );
    describe_counter!(
        "picket_watch_items_sent_total",
        "Items sent on watch and tail streams, by stream"
    );
    describe_counter!(
        "picket_watch_rewinds_total",
        "Times a subscriber fell behind its feed's shared buffer and re-read the store"
    );
    describe_histogram!(
        "picket_watch_hub_read_duration_seconds",
        Unit::Seconds,
        "Time a feed reader takes to read new entries from the store"
    );
    describe_histogram!(
        "picket_report_duration_seconds",
        Unit::Seconds,
        "Time to produce a report, by report (export_events: from the stream's start to its last event)"
    );
    describe_counter!(
        "picket_export_events_total",
        "Events sent by ExportEvents streams"
    );
    describe_histogram!(
        "picket_rollup_step_seconds",
        Unit::Seconds,
        "Time to fold one step of committed events into the report rollups"
    );
    describe_histogram!(
        "picket_rollup_pass_seconds",
        Unit::Seconds,
        "Time of one rollup pass (until caught up with the committed-event feed)"
    );
    describe_counter!(
        "picket_rollup_events_total",
        "Events folded into the report rollups"
    );
    describe_counter!(
        "picket_rollup_failures_total",
        "Rollup passes that failed (retried at the next interval)"
    );
    describe_counter!(
        "picket_sqlite_wal_checkpoints_total",
        "Forced WAL checkpoints of the embedded store, by result (done, busy, error)"
    );
    describe_histogram!(
        "picket_postgres_analyze_seconds",
        Unit::Seconds,
        "Time of a periodic ANALYZE of the Postgres tables that changed much since their last one"
    );
    describe_counter!(
        "picket_postgres_analyze_total",
        Unit::Count,
        "Postgres tables analyzed by the server (busy tables, between autovacuum's passes)"
    );
    describe_histogram!(
        "picket_sqlite_optimize_seconds",
        Unit::Seconds,
        "Time of the embedded store's periodic PRAGMA optimize (planner statistics)"
    );
    describe_gauge!(
        "picket_redis_connected",
        "1 while the replica signal subscription to Redis is up"
    );
    describe_counter!(
        "picket_replica_signals_published_total",
        "Change signals published to the other replicas"
    );
    describe_counter!(
        "picket_replica_signals_received_total",
        "Change signals received from other replicas, by outcome"
    );
    describe_counter!(
        "picket_redis_errors_total",
        "Failed Redis operations, by operation"
    );
    describe_gauge!(
        "picket_detection_leader",
        "1 while this replica leads at least one detection shard, 0 otherwise"
    );
    describe_gauge!(
        "picket_detection_shards_led",
        "Detection shards this replica leads (evaluates the tenants of)"
    );
    describe_gauge!(
        "picket_detection_replicas",
        "Replicas running detection on this store, as this replica last counted them"
    );
    describe_counter!(
        "picket_detection_shard_handovers_total",
        "Detection shards taken on or handed over by this replica, by direction: acquired, released"
    );
    describe_counter!(
        "picket_detection_shards_lost_total",
        "Times this replica lost all its detection shards because their lock connection failed"
    );
    describe_histogram!(
        "picket_detection_shard_rebuild_seconds",
        Unit::Seconds,
        "Time to rebuild the state of shards taken on (replay) before their tenants are evaluated live"
    );
    describe_counter!(
        "picket_alert_jobs_fenced_total",
        "Queued detections dropped because this replica lost its shards (the new leaders' replay raises them)"
    );
    describe_counter!(
        "picket_detect_evicted_total",
        "Per-entity detection state evicted at its cap (least recently seen first), by kind: window, baseline, group"
    );
    describe_histogram!(
        "picket_check_access_seconds",
        Unit::Seconds,
        "Server-side time of a CheckAccess call: authentication, validation and the in-memory decision lookup"
    );
    describe_counter!(
        "picket_check_access_total",
        "CheckAccess answers, by verdict"
    );
    describe_gauge!(
        "picket_decisions_active",
        "Enforcement decisions in force across tenants (as of the last expiry pass)"
    );
    describe_counter!(
        "picket_decision_writes_total",
        "Decision writes through this replica that changed something, by operation (create, revoke)"
    );
    describe_counter!(
        "picket_decisions_expired_total",
        "Effective-state changes logged by the expiry task (EXPIRED or UPDATED deltas)"
    );
    describe_gauge!(
        "picket_enforcement_tenants_loaded",
        "Tenants whose decisions this replica holds in memory (CheckAccess, WatchDecisions)"
    );
    describe_counter!(
        "picket_anomaly_trainings_total",
        "Anomaly model fits (at most one per tenant and population per --anomaly-train-interval-seconds, plus one after each drift)"
    );
    describe_counter!(
        "picket_anomaly_drift_total",
        "Anomaly models found stale (flagging far more than their contamination share: the population moved); each retrains at once and raises nothing meanwhile"
    );
    describe_counter!(
        "picket_playbook_runs_total",
        "Playbook runs reaching each status (pending_approval, approved, running, succeeded, failed, rejected, cancelled, expired)"
    );
    describe_histogram!(
        "picket_playbook_step_duration_seconds",
        Unit::Seconds,
        "Duration of one playbook step attempt, by action and outcome"
    );
    describe_counter!(
        "picket_playbook_notify_attempts_total",
        "Notification attempts by outcome (delivered, failed: retried, refused: not retried)"
    );
    describe_counter!(
        "picket_playbook_notify_refused_total",
        "Notifications refused because their target is not a public address (see --notify-allow-cidr)"
    );
    describe_counter!(
        "picket_playbook_claims_total",
        "Runnable playbook runs this process leased"
    );
    describe_counter!(
        "picket_playbook_takeovers_total",
        "Runs this process took over from a worker whose lease expired"
    );
    describe_counter!(
        "picket_playbook_leases_lost_total",
        "Runs whose lease this process lost while executing them"
    );
    describe_counter!(
        "picket_playbook_auto_runs_total",
        "Runs created by playbook triggers, by outcome (created, unresolved)"
    );
    describe_counter!(
        "picket_playbook_undos_total",
        "Playbook steps undone (their decision revoked)"
    );
}
