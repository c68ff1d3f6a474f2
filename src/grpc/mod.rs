//! The gRPC surface: generated code (`pb`), conversions, the status table,
//! per-call context and one file per service.
//!
//! **Architecture invariant:** only this module knows tonic and prost.

pub mod admin;
pub mod alerts;
pub mod codec;
pub mod convert;
pub mod enforcement;
pub mod events;
pub mod health;
pub mod incidents;
pub mod ingest;
pub mod playbooks;
pub mod reports;
pub mod rules;
pub mod status;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::access::auth::{API_KEY_HEADER, Authenticator, Caller};
use crate::domain::{Scope, TenantId};
use crate::error::{AppError, AppResult};
use crate::ingest::IngestWriter;
use crate::storage::Store;

/// Generated protobuf messages, clients and servers for `picket.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("picket.v1");
}

/// The encoded descriptor set of `picket.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/picket_descriptor.bin"));

/// The descriptors of `google.rpc.Status` and the error details Picket sends
/// (`BadRequest`, `RetryInfo`, `RequestInfo`), under their canonical file
/// names `google/rpc/status.proto` and `google/rpc/error_details.proto`, so
/// reflection clients (grpcurl) can print error details. tonic-types compiles
/// them as `status.proto` and `error_details.proto`; they are renamed here.
pub fn error_details_descriptors() -> prost_types::FileDescriptorSet {
    use prost::Message;
    let canonical = |name: &str| match name {
        "status.proto" | "error_details.proto" => format!("google/rpc/{name}"),
        other => other.to_owned(),
    };
    let mut set = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .expect("tonic-types ships a valid descriptor set");
    for file in &mut set.file {
        file.name = file.name.as_deref().map(canonical);
        for dep in &mut file.dependency {
            *dep = canonical(dep);
        }
    }
    set
}

/// A boxed response stream, as streaming RPCs return.
pub type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// What every service handler needs.
pub struct ApiContext {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Verifies `x-api-key`.
    pub auth: Authenticator,
    /// Cancelled when the server begins shutting down; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// The ingest write path.
    pub ingest: IngestWriter,
    /// Per-stream limits and defaults.
    pub limits: StreamLimits,
    /// Per-tenant wake-up after change-log writes (alerts, incidents); watch
    /// streams wait on it, the replica bridge publishes it.
    pub changes: Arc<crate::ingest::signal::Signal>,
    /// The server's built-in and directory rules.
    pub rules: crate::detect::SharedRules,
    /// Anomaly scoring settings (RunDetection uses them too).
    pub scoring: crate::pipeline::scoring::ScoringConfig,
    /// Repeats of an alert fingerprint within this long fold into one alert.
    pub alert_suppression: chrono::Duration,
    /// The shared feed readers of the watch streams.
    pub hubs: Arc<watch::Hubs>,
    /// The other replicas (and this one's detection pipeline): rule changes.
    pub peers: crate::cluster::replicas::Peers,
    /// Seals and opens webhook signing secrets.
    pub secrets: crate::webhooks::SecretBox,
    /// Playbooks, runs and their engine.
    pub response: Arc<crate::response::Responder>,
    /// Enforcement decisions: writes, and the index behind CheckAccess and
    /// WatchDecisions.
    pub decisions: crate::response::decisions::Decisions,
}

/// Limits and defaults of streaming RPCs.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most unacknowledged batches per IngestStream.
    pub stream_max_in_flight_batches: usize,
    /// Heartbeat interval when a request does not choose one.
    pub default_heartbeat: Duration,
    /// How often watch streams re-read the store without a wake-up signal.
    pub poll: Duration,
}

impl StreamLimits {
    /// The clocks of a watch stream with heartbeat interval `heartbeat`.
    pub fn timing(&self, heartbeat: Duration) -> watch::Timing {
        watch::Timing {
            heartbeat,
            poll: self.poll,
        }
    }

    /// The heartbeat interval for a request asking for `requested` seconds (0 = default).
    pub fn heartbeat_interval(&self, requested: u32) -> AppResult<Duration> {
        match requested {
            0 => Ok(self.default_heartbeat),
            1..=300 => Ok(Duration::from_secs(u64::from(requested))),
            _ => Err(AppError::invalid(
                "options.heartbeat_interval_seconds",
                "must be 1..300 (or 0 for the default)",
            )),
        }
    }
}

impl ApiContext {
    /// Follows `feed` from `start` for a stream with heartbeat interval
    /// `heartbeat`, woken by `wake` (see [`watch::follow`]).
    pub fn follow<F: watch::Feed>(
        &self,
        feed: F,
        start: crate::domain::event::FeedPosition,
        heartbeat: Duration,
        wake: tokio::sync::watch::Receiver<u64>,
    ) -> BoxStream<F::Msg> {
        watch::follow(
            feed,
            start,
            self.limits.timing(heartbeat),
            wake,
            self.hubs.clone(),
            self.shutdown.clone(),
        )
    }

    /// Authenticates the call and checks it holds `scope`.
    pub async fn caller<T>(&self, request: &Request<T>, scope: Scope) -> Result<Caller, Status> {
        let credential = request
            .metadata()
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok());
        let caller = self
            .auth
            .authenticate(credential)
            .await
            .map_err(status::to_status)?;
        caller.require(scope).map_err(status::to_status)?;
        tracing::Span::current().record("tenant", tracing::field::display(caller.actor()));
        Ok(caller)
    }

    /// [`ApiContext::caller`] for a call on a tenant's data: the caller and
    /// its tenant (the operator token has none and is refused).
    pub async fn tenant_caller<T>(
        &self,
        request: &Request<T>,
        scope: Scope,
    ) -> Result<(Caller, TenantId), Status> {
        let caller = self.caller(request, scope).await?;
        let tenant = caller.data_tenant().map_err(status::to_status)?;
        Ok((caller, tenant))
    }
}
