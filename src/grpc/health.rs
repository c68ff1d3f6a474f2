//! `grpc.health.v1.Health`, written here rather than using tonic-health's
//! reporter because that service's `Watch` streams never end: they would hold
//! graceful shutdown open for the whole grace period. Ours sends NOT_SERVING and
//! then ends every Watch stream when shutdown begins.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::grpc::BoxStream;

/// Serving state shared by the health service and the shutdown sequence.
#[derive(Clone)]
pub struct HealthState {
    /// true while serving; flipped to false once when shutdown begins.
    serving: watch::Sender<bool>,
    /// Services that health answers for ("" is the whole server).
    known: Arc<HashMap<String, ()>>,
    /// Cancelled at shutdown; ends Watch streams.
    shutdown: CancellationToken,
    /// Set once shutdown began: the store coming back never makes the
    /// server SERVING again.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl HealthState {
    /// Health for `services` (plus ""), serving from the start.
    pub fn new(services: &[&str], shutdown: CancellationToken) -> Self {
        let known = services
            .iter()
            .map(|s| (s.to_string(), ()))
            .chain([(String::new(), ())])
            .collect();
        Self {
            serving: watch::Sender::new(true),
            known: Arc::new(known),
            shutdown,
            stopping: Arc::default(),
        }
    }

    /// Marks every service NOT_SERVING (the first step of shutdown).
    pub fn set_not_serving(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.serving.send_replace(false);
    }

    /// Follows the store: NOT_SERVING while it cannot be reached (every RPC
    /// would fail), SERVING again once it can (never after shutdown began).
    pub fn set_store_reachable(&self, reachable: bool) {
        if !self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            self.serving.send_if_modified(|s| {
                let changed = *s != reachable;
                *s = reachable;
                changed
            });
        }
    }

    fn status(serving: bool) -> i32 {
        if serving {
            ServingStatus::Serving as i32
        } else {
            ServingStatus::NotServing as i32
        }
    }
}

#[tonic::async_trait]
impl Health for HealthState {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if !self.known.contains_key(&request.get_ref().service) {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(HealthCheckResponse {
            status: Self::status(*self.serving.borrow()),
        }))
    }

    type WatchStream = BoxStream<HealthCheckResponse>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let known = self.known.contains_key(&request.get_ref().service);
        let mut rx = self.serving.subscribe();
        let shutdown = self.shutdown.clone();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            if !known {
                let status = ServingStatus::ServiceUnknown as i32;
                let _ = tx.send(Ok(HealthCheckResponse { status })).await;
                return;
            }
            let mut last = *rx.borrow_and_update();
            if tx
                .send(Ok(HealthCheckResponse {
                    status: Self::status(last),
                }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() { break; }
                        let now = *rx.borrow_and_update();
                        if now != last {
                            last = now;
                            if tx.send(Ok(HealthCheckResponse { status: Self::status(now) })).await.is_err() { return; }
                        }
                    }
                    () = shutdown.cancelled() => break,
                    () = tx.closed() => return,
                }
            }
            // Shutdown: make sure the last word is NOT_SERVING, then end the stream.
            if last {
                let _ = tx
                    .send(Ok(HealthCheckResponse {
                        status: Self::status(false),
                    }))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
