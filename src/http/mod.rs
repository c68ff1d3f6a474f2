//! Plain HTTP on the gRPC port: `/healthz`, `/metrics`, webhook intake
//! (`POST /v1/webhooks/{source}`, see [`webhooks`]), the web console (`/`
//! and `/assets/…`, see [`console`]), and the request-metrics middleware
//! that wraps every route (gRPC included).

pub mod console;
pub mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::storage::Store;

/// What the plain HTTP routes need.
#[derive(Clone)]
pub struct HttpState {
    /// The store, pinged by `/healthz`.
    pub store: Arc<dyn Store>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Cancelled on shutdown; `/healthz` then answers 503.
    pub shutdown: CancellationToken,
    /// Opens webhook signing secrets.
    pub secrets: crate::webhooks::SecretBox,
    /// Bumped after a webhook raises an alert, so WatchAlerts streams wake.
    pub changes: Arc<crate::ingest::signal::Signal>,
    /// The other replicas: webhook delivery ids, Redis health.
    pub peers: crate::cluster::replicas::Peers,
    /// Repeats of an alert fingerprint within this long fold into one alert.
    pub alert_suppression: chrono::Duration,
    /// How webhook alerts are grouped into incidents.
    pub correlation: crate::incidents::CorrelationConfig,
    /// Detection's progress (`None`: detection is off in this process).
    pub detect_progress: Option<Arc<crate::pipeline::lag::DetectProgress>>,
}

/// The plain HTTP routes (no fallback: they are merged with the gRPC routes).
pub fn routes(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route(
            "/v1/webhooks/{source}",
            post(webhooks::deliver).layer(DefaultBodyLimit::max(crate::webhooks::MAX_BODY_BYTES)),
        )
        .with_state(state)
        .merge(console::routes())
}

/// `GET /healthz`: 200 with `{"status":"ok"}` when the store answers and the
/// server is not shutting down, 503 otherwise. `redis` reports the replica
/// signal channel (`off`, `up`, `down`); a replica without Redis keeps
/// serving, so it does not make the server unhealthy. `detect_lag_seconds`
/// is how far detection is behind ingest (see `pipeline/lag.rs`), `null`
/// when this process does not run detection (off, or it leads no shard);
/// a lag is reported, never judged: it does not make the server unhealthy.
/// `detect_shards` is how many detection shards this process leads (`null`
/// with detection off; see `pipeline/shards.rs`).
async fn healthz(State(state): State<HttpState>) -> Response {
    let redis = state.peers.redis_status();
    let lag = state
        .detect_progress
        .as_ref()
        .and_then(|p| p.lag_seconds(chrono::Utc::now()));
    let shards = state.detect_progress.as_ref().map(|p| p.shards());
    let json = |status: &str| json(status, redis, lag, shards);
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, json("shutting_down")).into_response();
    }
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, json("ok")).into_response(),
        Err(e) => {
            tracing::warn!(error = ?e, "health check: store unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, json("store_unavailable")).into_response()
        }
    }
}

fn json(
    status: &str,
    redis: &str,
    detect_lag_seconds: Option<f64>,
    detect_shards: Option<u32>,
) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({
            "status": status,
            "redis": redis,
            "detect_lag_seconds": detect_lag_seconds,
            "detect_shards": detect_shards,
        })
        .to_string(),
    )
}

/// `GET /metrics`: Prometheus text exposition.
async fn metrics_text(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Records `picket_grpc_requests_total` / `picket_grpc_request_duration_seconds`
/// for gRPC calls and `picket_http_requests_total` for everything else.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let path = request.uri().path().to_owned();
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let response = next.run(request).await;
    if is_grpc {
        // The code is known now only for trailers-only (error) responses; a
        // response that streams on reports `0` here and its errors go to
        // picket_grpc_errors_total.
        let code = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_owned();
        let method = path.trim_start_matches('/').to_owned();
        metrics::counter!("picket_grpc_requests_total", "method" => method.clone(), "code" => code)
            .increment(1);
        metrics::histogram!("picket_grpc_request_duration_seconds", "method" => method)
            .record(start.elapsed().as_secs_f64());
    } else {
        let route = match path.as_str() {
            "/healthz" | "/metrics" => path.clone(),
            p if p.starts_with("/v1/webhooks/") => "/v1/webhooks/{source}".to_owned(),
            "/" | "/index.html" => "/".to_owned(),
            p if p.starts_with("/assets/") => "/assets/{file}".to_owned(),
            _ => "other".to_owned(),
        };
        metrics::counter!("picket_http_requests_total", "route" => route, "status" => response.status().as_u16().to_string())
            .increment(1);
    }
    response
}
