//! Picket: a gRPC-first security event platform.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//!
//! - [`domain`]: tenants, keys, scopes, severities; no IO.
//! - [`anomaly`]: Isolation Forest and ECOD; pure math, no IO.
//! - [`detect`]: Sigma rules (rsigma), the default rule pack, behavioural
//!   detectors and the per-tenant evaluator; no IO except `detect::load_dir`.
//! - [`auth`]: API keys, keyed hashing, the operator token, [`auth::Caller`].
//! - [`admin`]: tenant and key administration shared by gRPC and the CLI.
//! - [`storage`]: the [`storage::Store`] trait and its Postgres and SQLite backends.
//! - [`grpc`]: generated code (`grpc::pb`), conversions, status mapping, services.
//! - [`http`]: `/healthz`, `/metrics`, webhook intake, request metrics.
//! - [`webhook`]: webhook secrets (sealed at rest), source administration,
//!   signature verification, the payload that becomes an alert.
//! - [`ingest`]: the batching write path and the post-commit hand-off.
//! - [`detect`]: Sigma rules (rsigma) and behavioural detectors; no IO but `load_dir`.
//! - [`incidents`]: correlation of alerts into incidents and manual incident changes.
//! - [`pipeline`]: follows committed events, evaluates rules, raises alerts.
//! - [`scoring`]: per-entity windows scored by per-tenant anomaly models.
//! - [`client`]: the CLI's gRPC client side: `picket ingest`, `tail`, `bench`.
//! - [`cli_anomaly`]: `picket anomaly score` (CSV in, scores out).
//! - [`config`], [`telemetry`], [`startup`], [`shutdown`], [`cli`]: the process around it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod anomaly;
pub mod auth;
pub mod cli;
pub mod cli_anomaly;
pub mod client;
pub mod config;
pub mod detect;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod http;
pub mod incidents;
pub mod ingest;
pub mod pipeline;
pub mod replicas;
pub mod retention;
pub mod scoring;
pub mod shutdown;
pub mod signal;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod webhook;
