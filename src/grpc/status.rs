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
        | AppError::FailedPrecondition(m) => Status::new(code, m),
    }
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
