//! The one table that turns [`AppError`] into a gRPC [`Status`].
//!
//! | AppError            | gRPC code           | details                         |
//! |---------------------|---------------------|---------------------------------|
//! | InvalidArgument     | INVALID_ARGUMENT    | google.rpc.BadRequest           |
//! | Unauthenticated     | UNAUTHENTICATED     |                                 |
//! | PermissionDenied    | PERMISSION_DENIED   |                                 |
//! | NotFound            | NOT_FOUND           |                                 |
//! | AlreadyExists       | ALREADY_EXISTS      |                                 |
//! | FailedPrecondition  | FAILED_PRECONDITION |                                 |
//! | Aborted             | ABORTED             |                                 |
//! | ResourceExhausted   | RESOURCE_EXHAUSTED  | google.rpc.RetryInfo            |
//! | Unavailable         | UNAVAILABLE         | google.rpc.RetryInfo            |
//! | Unimplemented       | UNIMPLEMENTED       |                                 |
//! | Internal            | INTERNAL            | google.rpc.RequestInfo (the id) |
//!
//! Internal errors are logged with their whole cause chain under a fresh
//! request id; the client gets only the id, never SQL, paths or driver text.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use crate::error::AppError;

/// Converts a service error into the status sent to the client.
pub fn to_status(err: AppError) -> Status {
    let code = code_of(&err);
    metrics::counter!("picket_grpc_errors_total", "code" => format!("{code:?}")).increment(1);
    match err {
        AppError::InvalidArgument(violations) => {
            let message = match violations.as_slice() {
                [one] => format!("invalid {}: {}", one.field, one.description),
                many => format!("{} invalid fields; see BadRequest details", many.len()),
            };
            let details = ErrorDetails::with_bad_request(
                violations
                    .into_iter()
                    .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                    .collect::<Vec<_>>(),
            );
            Status::with_error_details(code, message, details)
        }
        AppError::ResourceExhausted {
            message,
            retry_after,
        }
        | AppError::Unavailable {
            message,
            retry_after,
        } => Status::with_error_details(
            code,
            message,
            ErrorDetails::with_retry_info(Some(retry_after)),
        ),
        AppError::Internal(cause) => {
            let request_id = Uuid::new_v4().to_string();
            tracing::error!(request_id = %request_id, error = ?cause, "internal error");
            Status::with_error_details(
                code,
                format!("internal error (request id {request_id})"),
                ErrorDetails::with_request_info(request_id, ""),
            )
        }
        AppError::Unauthenticated(m) => Status::new(code, m),
        AppError::Unimplemented(m) => Status::new(code, m),
        AppError::PermissionDenied(m)
        | AppError::NotFound(m)
        | AppError::AlreadyExists(m)
        | AppError::FailedPrecondition(m)
        | AppError::Aborted(m) => Status::new(code, m),
    }
}

/// tonic refuses a request message over `--max-message-bytes` with
/// OUT_OF_RANGE ("decoded message length too large") before any handler runs;
/// Picket's contract, like gRPC's convention, is RESOURCE_EXHAUSTED. Other
/// statuses pass unchanged.
pub fn oversized_message(status: Status) -> Status {
    const TONIC: &str = "decoded message length too large: found ";
    if status.code() != Code::OutOfRange {
        return status;
    }
    let Some((_, sizes)) = status.message().split_once(TONIC) else {
        return status;
    };
    let number = |s: &str| -> String { s.chars().take_while(char::is_ascii_digit).collect() };
    let found = number(sizes);
    let limit = sizes
        .split_once("the limit is: ")
        .map(|(_, l)| number(l))
        .unwrap_or_default();
    metrics::counter!("picket_grpc_errors_total", "code" => format!("{:?}", Code::ResourceExhausted))
        .increment(1);
    Status::resource_exhausted(format!(
        "the request message is {found} bytes; this server accepts at most {limit} (--max-message-bytes)"
    ))
}

/// [`oversized_message`] for a response tonic answered before the handler
/// (unary and server-streaming calls: the status is in the headers).
pub async fn oversized_response(
    mut response: axum::response::Response,
) -> axum::response::Response {
    if response.headers().get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return response;
    }
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let mapped = oversized_message(status);
    if mapped.code() == Code::ResourceExhausted {
        let headers = response.headers_mut();
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            headers.remove(name);
        }
        let _ = mapped.add_header(headers);
    }
    response
}

/// The gRPC code for each error kind.
fn code_of(err: &AppError) -> Code {
    match err {
        AppError::InvalidArgument(_) => Code::InvalidArgument,
        AppError::Unauthenticated(_) => Code::Unauthenticated,
        AppError::PermissionDenied(_) => Code::PermissionDenied,
        AppError::NotFound(_) => Code::NotFound,
        AppError::AlreadyExists(_) => Code::AlreadyExists,
        AppError::FailedPrecondition(_) => Code::FailedPrecondition,
        AppError::Aborted(_) => Code::Aborted,
        AppError::ResourceExhausted { .. } => Code::ResourceExhausted,
        AppError::Unavailable { .. } => Code::Unavailable,
        AppError::Unimplemented(_) => Code::Unimplemented,
        AppError::Internal(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn internal_errors_hide_their_cause() {
        let cause: anyhow::Result<()> = Err(anyhow::anyhow!(
            "relation \"events\" does not exist at /var/lib/db"
        ))
        .context("failed to insert");
        let status = to_status(AppError::Internal(cause.unwrap_err()));
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().starts_with("internal error (request id "));
        assert!(!status.message().contains("relation"));
        assert!(!status.message().contains("/var/lib"));
        let id = status
            .get_details_request_info()
            .expect("request info")
            .request_id;
        assert!(status.message().contains(&id));
    }

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status = to_status(AppError::invalid(
            "events[2].source_ip",
            "not an IP address",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        let br = status
            .get_details_bad_request()
            .expect("bad request details");
        assert_eq!(br.field_violations[0].field, "events[2].source_ip");
        assert_eq!(br.field_violations[0].description, "not an IP address");
    }

    #[test]
    fn backpressure_carries_retry_info() {
        let status = to_status(AppError::ResourceExhausted {
            message: "too many batches in flight".into(),
            retry_after: std::time::Duration::from_millis(250),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let ri = status.get_details_retry_info().expect("retry info");
        assert_eq!(ri.retry_delay, Some(std::time::Duration::from_millis(250)));
    }
}
