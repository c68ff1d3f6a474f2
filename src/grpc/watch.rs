//! The one mechanism behind every watch stream (TailEvents, WatchAlerts, and
//! the incident watches): follow a tenant's commit-ordered feed in the store
//! from a position, send each item with its durable cursor, wake on a local
//! commit signal or every [`POLL`], send heartbeats when idle, and end cleanly
//! on shutdown or when the client goes away. The store is the source of truth:
//! a slow subscriber only reads the store later, holding at most
//! [`BUFFER`] items in memory, and never slows writers or other subscribers.

use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::domain::event::FeedPosition;
use crate::error::AppResult;
use crate::grpc::convert::timestamp;
use crate::grpc::status::to_status;
use crate::grpc::{BoxStream, pb};

/// Items read from the store per round trip.
const READ: u32 = 256;
/// Re-read interval without a local signal (other replicas' commits, rows
/// that become readable later).
pub const POLL: Duration = Duration::from_millis(500);
/// Items buffered per subscriber.
pub const BUFFER: usize = 64;

/// A feed a watch stream follows.
#[tonic::async_trait]
pub trait Feed: Send + Sync + 'static {
    /// The response message type.
    type Msg: Send + 'static;

    /// Entries after `after`: each with its position and, if it passes the
    /// stream's filter, the message to send (given its cursor).
    async fn read_after(
        &self,
        after: FeedPosition,
        limit: u32,
    ) -> AppResult<Vec<(FeedPosition, Option<Self::Msg>)>>;

    /// The newest readable position (for heartbeats).
    async fn head(&self) -> AppResult<Option<FeedPosition>>;

    /// The opaque cursor of a position.
    fn cursor(&self, at: FeedPosition) -> String;

    /// A heartbeat message.
    fn heartbeat(&self, hb: pb::Heartbeat) -> Self::Msg;

    /// Sets the cursor on an item message.
    fn with_cursor(&self, msg: Self::Msg, cursor: String) -> Self::Msg;
}

/// Starts following `feed` after `start`; returns the response stream.
pub fn follow<F: Feed>(
    feed: F,
    start: FeedPosition,
    heartbeat: Duration,
    mut wake: watch::Receiver<u64>,
    shutdown: CancellationToken,
    gauge: &'static str,
) -> BoxStream<F::Msg> {
    let (tx, rx) = mpsc::channel::<Result<F::Msg, Status>>(BUFFER);
    metrics::gauge!("picket_watch_streams_open", "stream" => gauge).increment(1.0);
    tokio::spawn(async move {
        let mut position = start;
        let mut last_sent = tokio::time::Instant::now();
        'outer: loop {
            let batch = match feed.read_after(position, READ).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(to_status(e))).await;
                    break;
                }
            };
            let full = batch.len() == READ as usize;
            for (pos, msg) in batch {
                position = pos;
                let Some(msg) = msg else { continue };
                let msg = feed.with_cursor(msg, feed.cursor(pos));
                tokio::select! {
                    sent = tx.send(Ok(msg)) => if sent.is_err() { break 'outer },
                    () = shutdown.cancelled() => break 'outer,
                }
                metrics::counter!("picket_watch_items_sent_total", "stream" => gauge).increment(1);
                last_sent = tokio::time::Instant::now();
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(POLL) => {}
                () = tokio::time::sleep_until(last_sent + heartbeat) => {
                    let head = feed.head().await.ok().flatten();
                    let hb = pb::Heartbeat {
                        server_time: Some(timestamp(Utc::now())),
                        head_cursor: head.map(|p| feed.cursor(p)).unwrap_or_default(),
                    };
                    if tx.send(Ok(feed.heartbeat(hb))).await.is_err() { break }
                    last_sent = tokio::time::Instant::now();
                }
                () = shutdown.cancelled() => break,
                () = tx.closed() => break,
            }
        }
        metrics::gauge!("picket_watch_streams_open", "stream" => gauge).decrement(1.0);
    });
    Box::pin(ReceiverStream::new(rx))
}
