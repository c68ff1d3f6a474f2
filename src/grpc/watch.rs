//! The one mechanism behind every watch stream (TailEvents, WatchAlerts and
//! the incident watches): follow a tenant's commit-ordered feed in the store
//! from a position, send each item with its durable cursor, send heartbeats
//! when idle, and end cleanly on shutdown or when the client goes away.
//!
//! **One reader per feed.** All subscribers of one tenant's feed (say, a
//! thousand WatchIncidents streams) share a *hub*: a task that wakes on the
//! local commit signal (or every poll interval), reads the new entries from
//! the store once, decodes them once, and broadcasts them in batches. Each
//! subscriber applies its own filter and keeps its own position.
//!
//! **Catch-up and rewind.** A subscriber reads the store itself while it is
//! behind: at start (from its cursor), when a batch begins after its position
//! (it joined between two reads), and when it fell more than [`HUB_BATCHES`]
//! batches behind the broadcast (a slow client: the broadcast ring drops its
//! oldest batches instead of growing, and the subscriber rewinds to its own
//! position in the store). So a slow subscriber never slows writers, the hub or
//! other subscribers; memory per feed is bounded by the ring and per
//! subscriber by [`BUFFER`] messages; and no subscriber misses or repeats an
//! item, because positions, not deliveries, decide what is sent next.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::domain::TenantId;
use crate::domain::event::FeedPosition;
use crate::error::AppResult;
use crate::grpc::convert::timestamp;
use crate::grpc::status::to_status;
use crate::grpc::{BoxStream, pb};

/// Entries read from the store per round trip.
const READ: u32 = 256;
/// Messages buffered per subscriber (between its task and the transport).
pub const BUFFER: usize = 64;
/// Batches a hub keeps for subscribers that are behind; beyond it they rewind.
pub const HUB_BATCHES: usize = 64;
/// First re-read after a wake-up that found nothing; the delay doubles up
/// to [`RECHECK_MAX`], and re-reading stops once the poll interval has passed.
const RECHECK_FIRST: Duration = Duration::from_millis(5);
/// Longest delay between such re-reads: what an entry that becomes readable
/// (its older transactions ended) can wait beyond that moment. Under ingest
/// load the wait for older transactions is a few hundred milliseconds, and a
/// delay doubling up to the poll interval added up to as much again.
const RECHECK_MAX: Duration = Duration::from_millis(50);

/// A feed a watch stream follows.
#[tonic::async_trait]
pub trait Feed: Send + Sync + 'static {
    /// The feed's name (one hub per name and tenant).
    const STREAM: &'static str;
    /// A decoded entry, shared by every subscriber of the feed.
    type Entry: Send + Sync + 'static;
    /// The response message type.
    type Msg: Send + 'static;

    /// The tenant whose feed this is.
    fn tenant(&self) -> TenantId;

    /// Entries after `after`, oldest first, each with its position; at most
    /// `limit`. Must not depend on the subscriber's filter (hubs share it).
    async fn read_after(
        &self,
        after: FeedPosition,
        limit: u32,
    ) -> AppResult<Vec<(FeedPosition, Self::Entry)>>;

    /// The newest readable position.
    async fn head(&self) -> AppResult<Option<FeedPosition>>;

    /// This subscriber's message for an entry, or `None` if its filter skips it.
    fn message(&self, entry: &Self::Entry) -> Option<Self::Msg>;

    /// The opaque cursor of a position.
    fn cursor(&self, at: FeedPosition) -> String;

    /// A heartbeat message.
    fn heartbeat(&self, hb: pb::Heartbeat) -> Self::Msg;

    /// Sets the cursor on an item message.
    fn with_cursor(&self, msg: Self::Msg, cursor: String) -> Self::Msg;
}

/// A stream's clocks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Idle time after which a heartbeat is sent.
    pub heartbeat: Duration,
    /// Re-read interval without a wake-up signal: bounds the delay of rows
    /// that become readable later and of other replicas' commits while their
    /// signal cannot reach this process.
    pub poll: Duration,
}

/// Entries a hub read in one go.
struct Batch<E> {
    /// The hub's position before them: a subscriber behind it has a gap to read.
    from: FeedPosition,
    /// The entries, oldest first.
    entries: Vec<(FeedPosition, E)>,
}

/// What a subscriber holds of a hub.
struct HubHandle<E> {
    batches: broadcast::Sender<Arc<Batch<E>>>,
    head: watch::Receiver<FeedPosition>,
}

/// Which hub: (feed name, tenant).
type HubKey = (&'static str, TenantId);

/// A subscriber's end of a hub: its batches and its read position.
type Subscription<E> = (
    broadcast::Receiver<Arc<Batch<E>>>,
    watch::Receiver<FeedPosition>,
);

/// The live hubs, one per (feed, tenant); each value is a `HubHandle` of the
/// feed's entry type.
#[derive(Default)]
pub struct Hubs {
    live: Mutex<HashMap<HubKey, Box<dyn Any + Send + Sync>>>,
}

impl Hubs {
    /// Subscribes to the hub of `feed`'s (stream, tenant), starting it if none runs.
    fn join<F: Feed>(
        self: &Arc<Self>,
        feed: &Arc<F>,
        wake: &watch::Receiver<u64>,
        poll: Duration,
        shutdown: &CancellationToken,
    ) -> Subscription<F::Entry> {
        let key = (F::STREAM, feed.tenant());
        let mut live = self.live.lock().expect("hub registry lock");
        if let Some(h) = live
            .get(&key)
            .and_then(|h| h.downcast_ref::<HubHandle<F::Entry>>())
        {
            return (h.batches.subscribe(), h.head.clone());
        }
        let (batches, rx) = broadcast::channel(HUB_BATCHES);
        let (head_tx, head) = watch::channel(FeedPosition::default());
        live.insert(
            key,
            Box::new(HubHandle {
                batches: batches.clone(),
                head: head.clone(),
            }),
        );
        tokio::spawn(run_hub(
            feed.clone(),
            self.clone(),
            batches,
            head_tx,
            wake.clone(),
            poll,
            shutdown.clone(),
        ));
        (rx, head)
    }

    /// Removes the hub of `key` if nobody listens to it any more; decided
    /// under the registry lock, so a joining subscriber either finds the hub
    /// alive or starts a new one.
    fn retire_if_unused<E: Send + Sync + 'static>(
        &self,
        key: HubKey,
        batches: &broadcast::Sender<Arc<Batch<E>>>,
    ) -> bool {
        let mut live = self.live.lock().expect("hub registry lock");
        if batches.receiver_count() > 0 {
            return false;
        }
        live.remove(&key);
        true
    }
}

/// A hub: reads the feed once per wake-up and broadcasts what it read.
async fn run_hub<F: Feed>(
    feed: Arc<F>,
    hubs: Arc<Hubs>,
    batches: broadcast::Sender<Arc<Batch<F::Entry>>>,
    head: watch::Sender<FeedPosition>,
    mut wake: watch::Receiver<u64>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let key = (F::STREAM, feed.tenant());
    metrics::gauge!("picket_watch_hubs", "stream" => F::STREAM).increment(1.0);
    let mut position: Option<FeedPosition> = None;
    // After a wake-up that found nothing new, look again soon: on Postgres a
    // committed entry becomes readable only once older transactions end.
    let mut recheck: Option<Duration> = None;
    // When the re-reading began (the first wake-up that found nothing).
    let mut rechecking_since: Option<std::time::Instant> = None;
    let mut woken = false;
    loop {
        if hubs.retire_if_unused(key, &batches) {
            break;
        }
        // Start at the head: subscribers read anything older themselves. An
        // empty first batch tells those that started before it that the hub
        // begins there, so they read the gap (which may hold a change that
        // committed meanwhile) instead of waiting for the next change.
        let at = match position {
            Some(p) => p,
            None => match feed.head().await {
                Ok(p) => {
                    let at = *position.insert(p.unwrap_or_default());
                    let _ = batches.send(Arc::new(Batch {
                        from: at,
                        entries: Vec::new(),
                    }));
                    at
                }
                Err(e) => {
                    tracing::warn!(stream = F::STREAM, error = %e, "watch hub could not read the feed head; retrying");
                    FeedPosition::default()
                }
            },
        };
        if position.is_some() {
            head.send_replace(at);
            let mut from = at;
            loop {
                let started = std::time::Instant::now();
                let read = feed.read_after(from, READ).await;
                metrics::histogram!("picket_watch_hub_read_duration_seconds", "stream" => F::STREAM)
                    .record(started.elapsed().as_secs_f64());
                match read {
                    Ok(entries) => {
                        let full = entries.len() == READ as usize;
                        if let Some((last, _)) = entries.last() {
                            let last = *last;
                            let _ = batches.send(Arc::new(Batch { from, entries }));
                            head.send_replace(last);
                            from = last;
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(e) => {
                        // Subscribers keep their positions; the next wake-up retries.
                        metrics::counter!("picket_watch_hub_read_errors_total", "stream" => F::STREAM)
                            .increment(1);
                        tracing::warn!(stream = F::STREAM, error = %e, "watch hub read failed; retrying");
                        break;
                    }
                }
            }
            recheck = if from != at || !woken {
                None
            } else {
                let since = *rechecking_since.get_or_insert_with(std::time::Instant::now);
                (since.elapsed() < poll)
                    .then(|| recheck.map_or(RECHECK_FIRST, |d| (d * 2).min(RECHECK_MAX)))
            };
            if recheck.is_none() {
                rechecking_since = None;
            }
            position = Some(from);
        }
        woken = tokio::select! {
            changed = wake.changed() => if changed.is_err() { break } else { true },
            () = tokio::time::sleep(recheck.unwrap_or(poll)) => recheck.is_some(),
            () = shutdown.cancelled() => break,
        };
    }
    metrics::gauge!("picket_watch_hubs", "stream" => F::STREAM).decrement(1.0);
}

/// Starts following `feed` after `start`; returns the response stream.
pub fn follow<F: Feed>(
    feed: F,
    start: FeedPosition,
    timing: Timing,
    wake: watch::Receiver<u64>,
    hubs: Arc<Hubs>,
    shutdown: CancellationToken,
) -> BoxStream<F::Msg> {
    let (tx, rx) = mpsc::channel::<Result<F::Msg, Status>>(BUFFER);
    let feed = Arc::new(feed);
    let (mut live, head) = hubs.join(&feed, &wake, timing.poll, &shutdown);
    metrics::gauge!("picket_watch_streams_open", "stream" => F::STREAM).increment(1.0);
    tokio::spawn(async move {
        let mut position = start;
        let mut behind = true;
        let mut last_sent = tokio::time::Instant::now();
        'outer: loop {
            if behind {
                // Catch up from the store at this subscriber's own pace.
                let entries = match feed.read_after(position, READ).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        break;
                    }
                };
                behind = entries.len() == READ as usize;
                let out = Outbox {
                    feed: &*feed,
                    tx: &tx,
                    shutdown: &shutdown,
                };
                if !out.send(&entries, &mut position, &mut last_sent).await {
                    break;
                }
                continue;
            }
            tokio::select! {
                got = live.recv() => match got {
                    Ok(batch) => {
                        if batch.from > position {
                            // Joined between two hub reads: fetch the gap.
                            behind = true;
                            continue;
                        }
                        let out = Outbox { feed: &*feed, tx: &tx, shutdown: &shutdown };
                        if !out.send(&batch.entries, &mut position, &mut last_sent).await {
                            break 'outer;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow for the shared ring: rewind to our own
                        // position and read the store (nothing lost, nothing held).
                        metrics::counter!("picket_watch_rewinds_total", "stream" => F::STREAM)
                            .increment(1);
                        live = live.resubscribe();
                        behind = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                () = tokio::time::sleep_until(last_sent + timing.heartbeat) => {
                    let head = (*head.borrow()).max(position);
                    let hb = pb::Heartbeat {
                        server_time: Some(timestamp(Utc::now())),
                        // Empty while the feed is empty.
                        head_cursor: if head == FeedPosition::default() {
                            String::new()
                        } else {
                            feed.cursor(head)
                        },
                    };
                    if tx.send(Ok(feed.heartbeat(hb))).await.is_err() { break }
                    last_sent = tokio::time::Instant::now();
                }
                () = shutdown.cancelled() => break,
                () = tx.closed() => break,
            }
        }
        metrics::gauge!("picket_watch_streams_open", "stream" => F::STREAM).decrement(1.0);
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Where a subscriber's messages go.
struct Outbox<'a, F: Feed> {
    feed: &'a F,
    tx: &'a mpsc::Sender<Result<F::Msg, Status>>,
    shutdown: &'a CancellationToken,
}

impl<F: Feed> Outbox<'_, F> {
    /// Sends the subscriber's messages for `entries` after `*position`,
    /// advancing it; `false` when the stream must end (client gone, shutdown).
    async fn send(
        &self,
        entries: &[(FeedPosition, F::Entry)],
        position: &mut FeedPosition,
        last_sent: &mut tokio::time::Instant,
    ) -> bool {
        for (pos, entry) in entries {
            if *pos <= *position {
                continue;
            }
            *position = *pos;
            let Some(msg) = self.feed.message(entry) else {
                continue;
            };
            let msg = self.feed.with_cursor(msg, self.feed.cursor(*pos));
            tokio::select! {
                r = self.tx.send(Ok(msg)) => if r.is_err() { return false },
                () = self.shutdown.cancelled() => return false,
            }
            metrics::counter!("picket_watch_items_sent_total", "stream" => F::STREAM).increment(1);
            *last_sent = tokio::time::Instant::now();
        }
        true
    }
}
