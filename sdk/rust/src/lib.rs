//! `picket-client`: Picket's Rust client SDK, with the same contract as the
//! Python SDK (`sdk/python`).
//!
//! Module map:
//! - [`client`]: [`TelemetryClient`], a bounded batching sender that keeps
//!   every event until its receipt arrives, retries with jittered backoff and
//!   counts every drop by reason.
//! - [`event`]: [`ActivityEvent`], the builder the application fills.
//! - [`layer`]: [`SecurityLayer`], a `tower` layer recording one event per
//!   HTTP or gRPC request (axum, hyper, tonic) and enforcing decisions.
//! - [`decisions`]: [`DecisionCache`], the tenant's effective decisions kept
//!   in sync through `WatchDecisions`, answering `check` in-process.
//! - [`transport`]: endpoints, TLS, the API key and retry classification
//!   (also used by the `picket` CLI).
//! - [`error`]: errors of constructing things; sending never errs into the app.
//! - [`pb`]: the generated `picket.v1` messages and clients.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod decisions;
pub mod error;
pub mod event;
pub mod layer;
pub mod transport;

/// Generated protobuf messages and clients for `picket.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("picket.v1");
}

pub use client::{ClientConfig, ClientStats, DropReason, Drops, Rejection, TelemetryClient};
pub use decisions::{DecisionCache, DenyReason, FailureMode, Verdict};
pub use error::{ClientError, ClientResult};
pub use event::{ActivityEvent, Outcome, Severity};
pub use layer::SecurityLayer;
pub use transport::{ApiKey, TlsOptions};
