//! `POST /v1/webhooks/{source}`: signed alerts from third-party systems.
//!
//! Order of checks, each answering with its own status and storing nothing:
//! body size (413) → source exists (404) → signature (401; stale timestamp
//! 401 with its own message) → delivery id and JSON payload (400) → one
//! transaction that records the delivery id and raises the alert (a repeated
//! delivery id answers 200 `{"status":"duplicate"}`). 2xx only after commit.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use secrecy::ExposeSecret;
use serde_json::json;

use crate::domain::webhook::DeliveryOutcome;
use crate::http::HttpState;
use crate::storage::StoreError;
use crate::webhooks::{
    self, DELIVERY_HEADER, LEGACY_SIGNATURE_HEADER, SIGNATURE_HEADER, SignatureError,
};

/// An answer: status, outcome label for `picket_webhook_requests_total`, JSON body.
struct Answer(StatusCode, &'static str, serde_json::Value);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let Answer(status, outcome, body) = self;
        metrics::counter!("picket_webhook_requests_total", "outcome" => outcome).increment(1);
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

fn error(status: StatusCode, outcome: &'static str, message: impl Into<String>) -> Answer {
    Answer(status, outcome, json!({ "error": message.into() }))
}

/// A delivery id already committed: 200, nothing stored again.
fn duplicate() -> Answer {
    Answer(
        StatusCode::OK,
        "duplicate",
        json!({ "status": "duplicate" }),
    )
}

/// Logs an internal error with its cause chain under a fresh request id; the
/// sender gets only the id.
fn internal(cause: anyhow::Error) -> Answer {
    let request_id = uuid::Uuid::new_v4().to_string();
    tracing::error!(request_id = %request_id, error = ?cause, "webhook: internal error");
    Answer(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        json!({ "error": "internal error", "request_id": request_id }),
    )
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Answer> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("header {name} is not visible ASCII"),
                )
            })
        })
        .transpose()
}

/// The handler (mounted under a body limit of [`webhooks::MAX_BODY_BYTES`]).
pub async fn deliver(
    State(state): State<HttpState>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match deliver_inner(state, &source, &headers, body).await {
        Ok(a) | Err(a) => a.into_response(),
    }
}

async fn deliver_inner(
    state: HttpState,
    source_name: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Answer, Answer> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body larger than {} bytes", webhooks::MAX_BODY_BYTES),
            )
        } else {
            error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "could not read the request body",
            )
        }
    })?;
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no webhook source `{source_name}`"),
        )
    };
    if crate::domain::webhook::WebhookSourceName::parse(source_name, "source").is_err() {
        return Err(not_found());
    }
    let source = state
        .store
        .find_webhook_source(source_name)
        .await
        .map_err(|e| internal(e.into()))?
        .ok_or_else(not_found)?;
    let secret = state
        .secrets
        .open(source.id, &source.sealed_secret)
        .ok_or_else(|| {
            internal(anyhow::anyhow!(
                "webhook source {} secret does not open (was the key pepper changed?)",
                source.id
            ))
        })?;
    let signature = header_str(headers, SIGNATURE_HEADER)?;
    let legacy = header_str(headers, LEGACY_SIGNATURE_HEADER)?;
    let now = Utc::now();
    webhooks::verify_signature(
        secret.expose_secret().as_bytes(),
        signature,
        legacy,
        &body,
        source.allow_body_only_signature,
        now,
    )
    .map_err(|e| {
        let outcome = match e {
            SignatureError::Stale(_) => "stale",
            _ => "unauthenticated",
        };
        error(StatusCode::UNAUTHORIZED, outcome, e.to_string())
    })?;
    let delivery = header_str(headers, DELIVERY_HEADER)?;
    if let Some(id) = delivery {
        webhooks::check_delivery_id(id)
            .map_err(|m| error(StatusCode::BAD_REQUEST, "bad_request", m))?;
    }
    let new = webhooks::parse_payload(&source.name, &body, now)
        .map_err(|m| error(StatusCode::BAD_REQUEST, "bad_request", m))?;
    // A delivery Redis remembers as committed is answered without the store.
    if let Some(id) = delivery
        && state.peers.delivery_committed(source.id, id).await
    {
        metrics::counter!("picket_webhook_redis_duplicates_total").increment(1);
        return Ok(duplicate());
    }
    let outcome = state
        .store
        .raise_webhook_alert(
            source.tenant_id,
            source.id,
            delivery,
            new,
            state.alert_suppression,
            now,
        )
        .await;
    if let (Some(id), Ok(_)) = (delivery, &outcome) {
        state.peers.remember_delivery(source.id, id).await;
    }
    match outcome {
        Ok(DeliveryOutcome::Duplicate) => Ok(duplicate()),
        Ok(DeliveryOutcome::Raised(alert, created)) => {
            // The alert is committed; grouping it into an incident follows it
            // (a failure here is logged and never loses the alert).
            if let Err(e) = crate::incidents::correlate(
                state.store.as_ref(),
                &alert,
                state.correlation,
                chrono::Utc::now(),
            )
            .await
            {
                tracing::error!(alert_id = %alert.id, error = %e, "incident correlation of a webhook alert failed");
            }
            state.changes.notify(source.tenant_id);
            tracing::info!(tenant_id = %source.tenant_id, source = %source.name, alert_id = %alert.id, created, "webhook alert raised");
            Ok(Answer(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                "accepted",
                json!({
                    "alert_id": alert.id.to_string(),
                    "status": if created { "created" } else { "updated" },
                }),
            ))
        }
        // Deleted between the lookup and the write.
        Err(StoreError::NotFound(_)) => Err(not_found()),
        Err(e) => Err(internal(e.into())),
    }
}
