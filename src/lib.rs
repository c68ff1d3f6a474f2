//! Picket: a gRPC-first security event platform.
//!
//! Module map, layer by layer; arrows point down (see ARCHITECTURE.md for
//! what each folder may import, and the invariants):
//!
//! Pure core (no IO, neither tonic nor sqlx):
//! - [`domain`]: tenants, keys, scopes, severities, events and their validity,
//!   alerts, incidents, rules.
//! - [`anomaly`]: Isolation Forest, ECOD, COPOD; pure math.
//! - [`detect`]: the detection engine: Sigma rules (rsigma), the default rule
//!   pack, behavioural detectors, behaviour windows, the per-tenant evaluator;
//!   no IO except `detect::load_dir`.
//!
//! Capabilities (application logic over [`storage::Store`]; no tonic, no sqlx):
//! - [`access`]: API keys, the operator token, [`access::auth::Caller`], tenant
//!   and key administration.
//! - [`ingest`]: the batching write path, the post-commit hand-off, per-tenant
//!   wake-up signals, retention.
//! - [`pipeline`]: the detection pipeline (follows committed events, raises
//!   alerts), anomaly scoring of behaviour windows, and detection shards
//!   (tenants shared out among the replicas).
//! - [`incidents`]: correlation of alerts into incidents, manual changes.
//! - [`webhooks`]: webhook sources, secrets sealed at rest, signature checks.
//! - [`response`]: enforcement decisions (bans, allows, throttles), the
//!   in-memory index behind CheckAccess and WatchDecisions, their expiry;
//!   response playbooks, runs under approval, the engine that executes them,
//!   automatic runs, signed outbound notifications.
//! - [`reports`]: the access report, security summary and dashboard metrics
//!   over the store's aggregates.
//! - [`error`]: [`error::AppError`], what every capability returns.
//!
//! Storage and transports:
//! - [`storage`]: the [`storage::Store`] trait, its Postgres and SQLite backends.
//! - [`grpc`]: generated code (`grpc::pb`), conversions, status table, services.
//! - [`http`]: `/healthz`, `/metrics`, webhook intake, the embedded web
//!   console (`/`), request metrics.
//!
//! The process:
//! - [`cluster`]: the Redis bridge that carries wake-up signals between replicas.
//! - [`server`]: settings, assembly (`Application`), shutdown, telemetry.
//! - [`cli`]: the commands, `picket anomaly score`, and the CLI's gRPC client
//!   side (ingest, tail, bench, simulate).
//!
//! Testing support:
//! - `fuzzing` (hidden): the entry points of the fuzz targets in `fuzz/` and
//!   of the corpus replay test; each drives the real parsers with raw bytes.
#![forbid(unsafe_code)]

pub mod access;
pub mod anomaly;
pub mod cli;
pub mod cluster;
pub mod detect;
pub mod domain;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod incidents;
pub mod ingest;
pub mod pipeline;
pub mod reports;
pub mod response;
pub mod server;
pub mod storage;
pub mod webhooks;
