//! The error every service operation returns. `grpc::status` maps it to a
//! gRPC status with one table; nothing else decides status codes.

use std::time::Duration;

use crate::domain::FieldViolation;
use crate::storage::StoreError;

/// Result of a service operation.
pub type AppResult<T> = Result<T, AppError>;

/// Why a service operation failed, in terms a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// One or more input fields are invalid.
    #[error("invalid argument: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    InvalidArgument(Vec<FieldViolation>),
    /// No valid credential was presented.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The credential is valid but lacks the needed scope or tenant.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The named thing does not exist (in the caller's tenant).
    #[error("not found: {0}")]
    NotFound(String),
    /// A thing with the same unique name already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The operation is not allowed in the current state.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// An optimistic-concurrency check failed: the thing changed since the
    /// version the caller names; read it again and retry.
    #[error("aborted: {0}")]
    Aborted(String),
    /// A limit was hit; retry after the given delay.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// What limit was hit.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The server cannot take the call right now (shutting down, overloaded).
    #[error("unavailable: {message}")]
    Unavailable {
        /// Why.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The RPC is part of the contract but not implemented yet.
    #[error("unimplemented: {0}")]
    Unimplemented(&'static str),
    /// Anything else. Logged with its cause chain; the client sees only a request id.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl AppError {
    /// The store is out of disk space: retryable once space is freed.
    pub fn disk_full() -> Self {
        Self::ResourceExhausted {
            message:
                "the store is out of disk space: nothing was written; retry once space is freed"
                    .into(),
            retry_after: Duration::from_secs(5),
        }
    }

    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl From<FieldViolation> for AppError {
    fn from(v: FieldViolation) -> Self {
        Self::InvalidArgument(vec![v])
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::NotFound(what),
            StoreError::Conflict(what) => Self::AlreadyExists(what),
            StoreError::LimitReached(what) => Self::ResourceExhausted {
                message: what,
                retry_after: Duration::from_secs(60),
            },
            StoreError::Unavailable(e) => {
                // The client sees a retryable status; the cause goes to the log.
                tracing::warn!(error = ?e, "store unavailable");
                Self::Unavailable {
                    message: "the store is unavailable; retry after the delay given".into(),
                    retry_after: Duration::from_secs(1),
                }
            }
            StoreError::Full(e) => {
                tracing::error!(error = ?e, "store out of disk space");
                Self::disk_full()
            }
            StoreError::Unexpected(e) => Self::Internal(e),
        }
    }
}
