//! `TelemetryClient`: a bounded batching sender with per-event receipts,
//! the same contract as the Python SDK's.
//!
//! * [`TelemetryClient::enqueue_event`] never blocks on the network, never
//!   panics into the caller and returns no error: it appends to a bounded
//!   buffer. When the buffer (queued plus in flight) already holds
//!   `max_queue_size` events, the *new* event is dropped as `queue_full`;
//!   what was accepted is never evicted.
//! * One sender task per client sends batches of up to `max_batch_size`
//!   every `flush_interval` (sooner when a batch is full) with
//!   `IngestService.Ingest`. An event leaves the buffer only when its receipt
//!   says ACCEPTED or DUPLICATE. Every event carries an idempotency key
//!   (generated when absent: a random 128-bit prefix per client and a
//!   counter), so a resend after a lost answer is stored once.
//! * UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED, UNKNOWN and
//!   RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` are retried with jittered
//!   exponential backoff, never sooner than RetryInfo says, up to
//!   `max_retry_attempts` retries per batch; then the batch is dropped as
//!   `retries_exhausted`. RESOURCE_EXHAUSTED without RetryInfo (over the
//!   server's message size) splits the batch. REJECTED receipts, and statuses
//!   a resend cannot cure, drop their events as `rejected`, reported to
//!   `on_rejected` and logged.
//! * [`TelemetryClient::close`] stops intake, sends what it can before its
//!   deadline, counts the rest as `shutdown_deadline` (reported to
//!   `on_drop`) and returns the final stats.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::decisions::{DecisionCache, FailureMode};
use crate::error::{ClientError, ClientResult};
use crate::event::{ActivityEvent, SOURCE_SYSTEM};
use crate::pb;
use crate::transport::{self, ApiKey, Backoff, Retry, TlsOptions};

/// Largest request the sender builds: under the server's default 4 MiB limit.
const MAX_BATCH_BYTES: usize = 3 * 1024 * 1024;

/// Why events were dropped, as counted in [`Drops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The buffer held `max_queue_size` events when it was enqueued.
    QueueFull,
    /// Picket (or the client) refused it; resending cannot help.
    Rejected,
    /// Its batch failed `1 + max_retry_attempts` times.
    RetriesExhausted,
    /// Still unsent at the close deadline, or enqueued after `close()`.
    ShutdownDeadline,
}

impl DropReason {
    /// The reason as the Python SDK names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::ShutdownDeadline => "shutdown_deadline",
        }
    }
}

/// Dropped events by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// See [`DropReason::QueueFull`].
    pub queue_full: u64,
    /// See [`DropReason::Rejected`].
    pub rejected: u64,
    /// See [`DropReason::RetriesExhausted`].
    pub retries_exhausted: u64,
    /// See [`DropReason::ShutdownDeadline`].
    pub shutdown_deadline: u64,
}

impl Drops {
    /// Every dropped event.
    pub fn total(&self) -> u64 {
        self.queue_full + self.rejected + self.retries_exhausted + self.shutdown_deadline
    }
}

/// A client's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Events `enqueue_event` took into the buffer.
    pub enqueued: u64,
    /// Events whose receipt was ACCEPTED.
    pub accepted: u64,
    /// Events whose receipt was DUPLICATE (stored before: a resend).
    pub duplicates: u64,
    /// Ingest calls that failed and were retried.
    pub retries: u64,
    /// Events held now (queued or in flight).
    pub buffered: u64,
    /// Dropped events by reason.
    pub dropped: Drops,
}

impl ClientStats {
    /// Events Picket has stored (accepted now or before).
    pub fn delivered(&self) -> u64 {
        self.accepted + self.duplicates
    }
}

/// An event Picket (or the client) refused.
#[derive(Debug)]
pub struct Rejection<'a> {
    /// The event as it was sent.
    pub event: &'a pb::Event,
    /// The offending field (`source_ip`, `attributes["k"]`), empty when the
    /// whole call was refused.
    pub field_path: &'a str,
    /// Why, in words.
    pub reason: &'a str,
}

/// Called for every refused event.
pub type RejectedCallback = Arc<dyn Fn(&Rejection<'_>) + Send + Sync>;
/// Called for every dropped event, with its reason.
pub type DropCallback = Arc<dyn Fn(DropReason, &[pb::Event]) + Send + Sync>;

/// How a [`TelemetryClient`] behaves. `ClientConfig::new(key, endpoint)`
/// gives the documented defaults; change fields with struct update syntax.
#[derive(Clone)]
pub struct ClientConfig {
    /// A Picket API key: `ingest` scope, plus `read` for enforcement.
    pub api_key: String,
    /// Picket's address, `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// Default `service` of events that set none.
    pub service_name: String,
    /// Default `environment` of events that set none.
    pub environment: String,
    /// The longest an event waits before its batch is sent (5 s).
    pub flush_interval: Duration,
    /// Events per `Ingest` call, 1..1,000 (100); also at most 3 MiB.
    pub max_batch_size: usize,
    /// Retries per batch after its first attempt (3).
    pub max_retry_attempts: u32,
    /// Events held in memory, queued or in flight (10,000).
    pub max_queue_size: usize,
    /// How long `close()` may spend sending (5 s).
    pub shutdown_timeout: Duration,
    /// Deadline of one `Ingest` call (10 s).
    pub request_timeout: Duration,
    /// Backoff: retry n waits a random time in [d/2, d],
    /// d = min(max, initial·2ⁿ), never less than the server's RetryInfo
    /// (1 s and 30 s).
    pub retry_initial_backoff: Duration,
    /// See `retry_initial_backoff`.
    pub retry_max_backoff: Duration,
    /// TLS for an `https://` endpoint.
    pub tls: TlsOptions,
    /// Called for every event Picket (or the client) refused.
    pub on_rejected: Option<RejectedCallback>,
    /// Called for every dropped event, with its reason.
    pub on_drop: Option<DropCallback>,
}

impl ClientConfig {
    /// The defaults, for `api_key` at `endpoint`.
    pub fn new(api_key: impl Into<String>, endpoint: impl Into<String>) -> Self {
        Self {
            api_key: api_key.into(),
            endpoint: endpoint.into(),
            service_name: String::new(),
            environment: String::new(),
            flush_interval: Duration::from_secs(5),
            max_batch_size: 100,
            max_retry_attempts: 3,
            max_queue_size: 10_000,
            shutdown_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(30),
            tls: TlsOptions::default(),
            on_rejected: None,
            on_drop: None,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("api_key", &"[redacted]")
            .field("endpoint", &self.endpoint)
            .field("service_name", &self.service_name)
            .field("environment", &self.environment)
            .field("flush_interval", &self.flush_interval)
            .field("max_batch_size", &self.max_batch_size)
            .field("max_retry_attempts", &self.max_retry_attempts)
            .field("max_queue_size", &self.max_queue_size)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Sends events to Picket in the background. Cheap to clone: clones share
/// one buffer and one sender.
#[derive(Clone)]
pub struct TelemetryClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TelemetryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryClient")
            .field("endpoint", &self.inner.config.endpoint)
            .field("stats", &self.stats())
            .finish()
    }
}

struct Inner {
    /// The configuration, limits clamped.
    config: ClientConfig,
    /// The key, checked once.
    key: ApiKey,
    /// One lazily connected channel for ingest (and the decision stream).
    channel: Channel,
    /// The buffer and the sender's flags.
    state: Mutex<State>,
    /// Wakes the sender: first event, full batch, flush, close.
    wake: Notify,
    /// The close deadline, once `close()` ran; the sender's waits end at it.
    close_deadline: watch::Sender<Option<Instant>>,
    /// Counters.
    counters: Counters,
    /// Generated idempotency keys: a random 128-bit prefix per client and a
    /// counter, unique without a syscall per event.
    key_prefix: String,
    /// The counter of generated keys.
    key_seq: AtomicU64,
    /// The sender task, taken by `close()`.
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The decision cache, started on first use.
    decisions: OnceLock<DecisionCache>,
}

struct State {
    /// Queued events in arrival order.
    queue: VecDeque<pb::Event>,
    /// Events the sender took and has not settled.
    in_flight: u64,
    /// `close()` was called: no more intake.
    closing: bool,
    /// `flush()` asked to send now.
    flush_requested: bool,
    /// `close()` counted what was left; late outcomes of the sender are ignored.
    abandoned: bool,
    /// When the last batch was sent (or the queue was last empty).
    last_flush: Instant,
}

#[derive(Default)]
struct Counters {
    enqueued: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    queue_full: AtomicU64,
    rejected: AtomicU64,
    retries_exhausted: AtomicU64,
    shutdown_deadline: AtomicU64,
}

impl Counters {
    fn drop_counter(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::QueueFull => &self.queue_full,
            DropReason::Rejected => &self.rejected,
            DropReason::RetriesExhausted => &self.retries_exhausted,
            DropReason::ShutdownDeadline => &self.shutdown_deadline,
        }
    }
}

/// One event in the sender's hands: the event (for callbacks) and its
/// encoded `IngestRequest.events` entry (encoded once, resent as is).
struct Pending {
    event: pb::Event,
    entry: Bytes,
}

/// How one event's delivery ended.
#[derive(Clone, Copy)]
enum Settled {
    Accepted,
    Duplicate,
    Dropped(DropReason),
}

impl TelemetryClient {
    /// A client for `config`, with its sender task spawned on the current
    /// Tokio runtime. Never touches the network: the channel connects on
    /// first use and reconnects by itself.
    pub fn new(mut config: ClientConfig) -> ClientResult<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        let key = ApiKey::new(&config.api_key)?;
        let channel = transport::connect_lazy(&config.endpoint, &config.tls)?;
        config.max_batch_size = config.max_batch_size.clamp(1, 1000);
        config.max_queue_size = config.max_queue_size.max(1);
        config.flush_interval = config.flush_interval.max(Duration::from_millis(10));
        let inner = Arc::new(Inner {
            config,
            key,
            channel,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                in_flight: 0,
                closing: false,
                flush_requested: false,
                abandoned: false,
                last_flush: Instant::now(),
            }),
            wake: Notify::new(),
            close_deadline: watch::Sender::new(None),
            counters: Counters::default(),
            key_prefix: format!("{:032x}-", rand::random::<u128>()),
            key_seq: AtomicU64::new(0),
            worker: Mutex::new(None),
            decisions: OnceLock::new(),
        });
        let worker = runtime.spawn(run_sender(inner.clone()));
        *lock(&inner.worker) = Some(worker);
        Ok(Self { inner })
    }

    /// Queues an event. Never blocks on IO, never panics, never fails into
    /// the caller: returns whether the event was queued (false: dropped and
    /// counted, see [`Self::stats`]).
    pub fn enqueue_event(&self, event: impl Into<ActivityEvent>) -> bool {
        let inner = &self.inner;
        let mut event = event.into().event;
        let config = &inner.config;
        if event.occurred_at.is_none() {
            event.occurred_at = Some(prost_types::Timestamp::from(SystemTime::now()));
        }
        if event.service.is_empty() {
            event.service.clone_from(&config.service_name);
        }
        if event.environment.is_empty() {
            event.environment.clone_from(&config.environment);
        }
        if event.source_system.is_empty() {
            event.source_system = SOURCE_SYSTEM.to_owned();
        }
        if event.idempotency_key.is_empty() {
            let n = inner.key_seq.fetch_add(1, Ordering::Relaxed);
            event.idempotency_key = format!("{}{n:x}", inner.key_prefix);
        }
        let dropped = {
            let mut state = lock(&inner.state);
            if state.closing {
                Some(DropReason::ShutdownDeadline)
            } else if state.queue.len() as u64 + state.in_flight >= config.max_queue_size as u64 {
                Some(DropReason::QueueFull)
            } else {
                state.queue.push_back(event);
                inner.counters.enqueued.fetch_add(1, Ordering::Relaxed);
                let len = state.queue.len();
                drop(state);
                if len == 1 || len >= config.max_batch_size {
                    // The sender sleeps until the first event arrives, then
                    // until its flush time or a full batch.
                    inner.wake.notify_one();
                }
                return true;
            }
        };
        if let Some(reason) = dropped {
            let n = inner
                .counters
                .drop_counter(reason)
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    reason = reason.as_str(),
                    dropped = n,
                    "picket: event dropped on enqueue"
                );
            }
            inner.report_drop(reason, std::slice::from_ref(&event));
        }
        false
    }

    /// Asks the sender to send everything queued now and waits until the
    /// buffer is empty; whether it emptied within `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        lock(&self.inner.state).flush_requested = true;
        self.inner.wake.notify_one();
        loop {
            {
                let state = lock(&self.inner.state);
                if state.queue.is_empty() && state.in_flight == 0 {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The counters now.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        let buffered = {
            let state = lock(&self.inner.state);
            if state.abandoned {
                0
            } else {
                state.queue.len() as u64 + state.in_flight
            }
        };
        ClientStats {
            enqueued: c.enqueued.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            buffered,
            dropped: Drops {
                queue_full: c.queue_full.load(Ordering::Relaxed),
                rejected: c.rejected.load(Ordering::Relaxed),
                retries_exhausted: c.retries_exhausted.load(Ordering::Relaxed),
                shutdown_deadline: c.shutdown_deadline.load(Ordering::Relaxed),
            },
        }
    }

    /// Stops intake, sends what it can within `shutdown_timeout`, drops the
    /// rest as `shutdown_deadline` (logged and passed to `on_drop`) and
    /// returns the final stats. Safe to call more than once.
    pub async fn close(&self) -> ClientStats {
        self.close_within(self.inner.config.shutdown_timeout).await
    }

    /// [`Self::close`] with an explicit deadline.
    pub async fn close_within(&self, timeout: Duration) -> ClientStats {
        let inner = &self.inner;
        let deadline = {
            let mut state = lock(&inner.state);
            if !state.closing {
                state.closing = true;
                inner
                    .close_deadline
                    .send_replace(Some(Instant::now() + timeout));
            }
            (*inner.close_deadline.borrow()).unwrap_or_else(Instant::now)
        };
        inner.wake.notify_one();
        let worker = lock(&inner.worker).take();
        if let Some(mut worker) = worker {
            // The sender's calls are bounded by the deadline; the grace
            // covers a call that was already on the wire.
            let grace = deadline + Duration::from_millis(500);
            if tokio::time::timeout_at(grace, &mut worker).await.is_err() {
                worker.abort();
            }
        }
        let (left, lost) = {
            let mut state = lock(&inner.state);
            if state.abandoned {
                (Vec::new(), 0)
            } else {
                state.abandoned = true;
                let left: Vec<pb::Event> = state.queue.drain(..).collect();
                let lost = std::mem::take(&mut state.in_flight);
                (left, lost)
            }
        };
        let unsent = left.len() as u64 + lost;
        if unsent > 0 {
            inner
                .counters
                .shutdown_deadline
                .fetch_add(unsent, Ordering::Relaxed);
            tracing::warn!(
                events = unsent,
                timeout_ms = timeout.as_millis() as u64,
                "picket: events not sent before the shutdown deadline"
            );
            inner.report_drop(DropReason::ShutdownDeadline, &left);
        }
        if let Some(decisions) = inner.decisions.get() {
            decisions.close();
        }
        self.stats()
    }

    /// This client's local copy of the tenant's effective decisions, kept
    /// in sync through `WatchDecisions` (started on first use; the key needs
    /// the `read` scope), answering with `failure_mode` while out of sync.
    pub fn decisions(&self, failure_mode: FailureMode) -> DecisionCache {
        self.inner
            .decisions
            .get_or_init(|| {
                DecisionCache::watch(self.inner.channel.clone(), self.inner.key.clone())
            })
            .with_failure_mode(failure_mode)
    }

    /// The client's channel (lazily connected), for other calls to Picket.
    pub fn channel(&self) -> Channel {
        self.inner.channel.clone()
    }

    /// The client's API key.
    pub fn api_key(&self) -> &ApiKey {
        &self.inner.key
    }
}

/// Locks `m`; a panic elsewhere while holding it does not poison the client.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn report_drop(&self, reason: DropReason, events: &[pb::Event]) {
        if events.is_empty() {
            return;
        }
        if let Some(on_drop) = &self.config.on_drop {
            let call = std::panic::AssertUnwindSafe(|| on_drop(reason, events));
            if std::panic::catch_unwind(call).is_err() {
                tracing::error!("picket: the on_drop callback panicked");
            }
        }
    }

    /// Takes `items` out of the buffer as `outcome`.
    fn settle(&self, items: Vec<Pending>, outcome: Settled) {
        if items.is_empty() {
            return;
        }
        let n = items.len() as u64;
        {
            let mut state = lock(&self.state);
            if state.abandoned {
                return;
            }
            state.in_flight = state.in_flight.saturating_sub(n);
        }
        let c = &self.counters;
        match outcome {
            Settled::Accepted => {
                c.accepted.fetch_add(n, Ordering::Relaxed);
            }
            Settled::Duplicate => {
                c.duplicates.fetch_add(n, Ordering::Relaxed);
            }
            Settled::Dropped(reason) => {
                c.drop_counter(reason).fetch_add(n, Ordering::Relaxed);
                if reason != DropReason::ShutdownDeadline && reason != DropReason::Rejected {
                    tracing::warn!(
                        events = n,
                        reason = reason.as_str(),
                        "picket: events dropped"
                    );
                }
                let events: Vec<pb::Event> = items.into_iter().map(|p| p.event).collect();
                self.report_drop(reason, &events);
            }
        }
    }

    fn reject(&self, item: Pending, field_path: &str, reason: &str) {
        tracing::warn!(
            idempotency_key = %item.event.idempotency_key,
            field_path = if field_path.is_empty() { "(event)" } else { field_path },
            reason,
            "picket: event rejected"
        );
        if let Some(on_rejected) = &self.config.on_rejected {
            let rejection = Rejection {
                event: &item.event,
                field_path,
                reason,
            };
            let call = std::panic::AssertUnwindSafe(|| on_rejected(&rejection));
            if std::panic::catch_unwind(call).is_err() {
                tracing::error!("picket: the on_rejected callback panicked");
            }
        }
        self.settle(vec![item], Settled::Dropped(DropReason::Rejected));
    }

    fn deadline(&self) -> Option<Instant> {
        *self.close_deadline.borrow()
    }
}

/// The sender task.
async fn run_sender(inner: Arc<Inner>) {
    let mut close_rx = inner.close_deadline.subscribe();
    while let Some(batch) = next_batch(&inner, &mut close_rx).await {
        deliver(&inner, batch, &mut close_rx).await;
        let mut state = lock(&inner.state);
        state.last_flush = Instant::now();
        if state.queue.is_empty() && state.in_flight == 0 {
            state.flush_requested = false;
        }
    }
}

/// Waits for a batch to send; `None` once closing with nothing left (or
/// past the deadline).
async fn next_batch(
    inner: &Inner,
    close_rx: &mut watch::Receiver<Option<Instant>>,
) -> Option<Vec<pb::Event>> {
    let config = &inner.config;
    loop {
        let wait = {
            let mut state = lock(&inner.state);
            let now = Instant::now();
            let past_deadline = inner.deadline().is_some_and(|d| now >= d);
            if state.closing && (state.queue.is_empty() || past_deadline) {
                return None;
            }
            if !state.queue.is_empty()
                && (state.closing
                    || state.flush_requested
                    || state.queue.len() >= config.max_batch_size
                    || now.duration_since(state.last_flush) >= config.flush_interval)
            {
                let n = config.max_batch_size.min(state.queue.len());
                let batch: Vec<pb::Event> = state.queue.drain(..n).collect();
                state.in_flight += n as u64;
                return Some(batch);
            }
            if state.queue.is_empty() {
                state.last_flush = now;
                None
            } else {
                Some(state.last_flush + config.flush_interval)
            }
        };
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = sleep_until_opt(wait) => {}
            _ = close_rx.changed() => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Encodes `batch` and sends it in requests of at most [`MAX_BATCH_BYTES`]
/// until every event has a final outcome.
async fn deliver(
    inner: &Inner,
    batch: Vec<pb::Event>,
    close_rx: &mut watch::Receiver<Option<Instant>>,
) {
    let mut parts: Vec<(Vec<Pending>, u32)> = Vec::new();
    let mut current = Vec::with_capacity(batch.len());
    let mut size = 0;
    for event in batch {
        let mut entry = BytesMut::with_capacity(event.encoded_len() + 6);
        prost::encoding::message::encode(1, &event, &mut entry);
        let entry = entry.freeze();
        if !current.is_empty() && size + entry.len() > MAX_BATCH_BYTES {
            parts.push((std::mem::take(&mut current), 0));
            size = 0;
        }
        size += entry.len();
        current.push(Pending { event, entry });
    }
    if !current.is_empty() {
        parts.push((current, 0));
    }
    // Sent in order: the stack pops the last part first.
    parts.reverse();
    let backoff = Backoff {
        initial: inner.config.retry_initial_backoff,
        max: inner.config.retry_max_backoff,
    };
    while let Some((pending, attempt)) = parts.pop() {
        let now = Instant::now();
        let deadline = inner.deadline();
        if deadline.is_some_and(|d| now >= d) {
            inner.settle(pending, Settled::Dropped(DropReason::ShutdownDeadline));
            for (rest, _) in parts.drain(..) {
                inner.settle(rest, Settled::Dropped(DropReason::ShutdownDeadline));
            }
            return;
        }
        let mut timeout = inner.config.request_timeout;
        if let Some(d) = deadline {
            timeout = timeout.min(d - now).max(Duration::from_millis(50));
        }
        match ingest(inner, &pending, timeout).await {
            Ok(response) => {
                let mut status = vec![0i32; pending.len()];
                let mut details: Vec<Option<pb::EventReceipt>> = vec![None; pending.len()];
                for r in response.receipts {
                    let i = r.index as usize;
                    if i < pending.len() {
                        status[i] = r.status;
                        details[i] = Some(r);
                    }
                }
                let (mut accepted, mut duplicate, mut again) = (Vec::new(), Vec::new(), Vec::new());
                for ((item, status), receipt) in pending.into_iter().zip(status).zip(details) {
                    match pb::ReceiptStatus::try_from(status) {
                        Ok(pb::ReceiptStatus::Accepted) => accepted.push(item),
                        Ok(pb::ReceiptStatus::Duplicate) => duplicate.push(item),
                        Ok(pb::ReceiptStatus::Rejected) => {
                            let r = receipt.unwrap_or_default();
                            inner.reject(item, &r.field_path, &r.reason);
                        }
                        _ => again.push(item),
                    }
                }
                inner.settle(accepted, Settled::Accepted);
                inner.settle(duplicate, Settled::Duplicate);
                if !again.is_empty() {
                    parts.push((again, attempt));
                }
            }
            Err(status) => match transport::classify(&status) {
                Retry::Split if pending.len() > 1 => {
                    let mut first = pending;
                    let second = first.split_off(first.len() / 2);
                    parts.push((second, attempt));
                    parts.push((first, attempt));
                }
                Retry::Split | Retry::Never => {
                    tracing::error!(
                        code = ?status.code(),
                        message = status.message(),
                        events = pending.len(),
                        "picket: ingest refused; dropping the batch"
                    );
                    let reason = format!("{:?}: {}", status.code(), status.message());
                    for item in pending {
                        inner.reject(item, "", &reason);
                    }
                }
                Retry::After(floor) => {
                    if attempt >= inner.config.max_retry_attempts {
                        tracing::warn!(
                            attempts = attempt + 1,
                            code = ?status.code(),
                            message = status.message(),
                            "picket: ingest kept failing"
                        );
                        inner.settle(pending, Settled::Dropped(DropReason::RetriesExhausted));
                        continue;
                    }
                    let delay = backoff.delay(attempt, floor);
                    inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        code = ?status.code(),
                        message = status.message(),
                        retry = attempt + 1,
                        delay_ms = delay.as_millis() as u64,
                        "picket: ingest failed; retrying"
                    );
                    pause(delay, close_rx).await;
                    parts.push((pending, attempt + 1));
                }
            },
        }
    }
}

/// Sleeps `delay`, ending early at the close deadline.
async fn pause(delay: Duration, close_rx: &mut watch::Receiver<Option<Instant>>) {
    let end = Instant::now() + delay;
    loop {
        let stop = match *close_rx.borrow_and_update() {
            Some(d) => end.min(d),
            None => end,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(stop) => return,
            changed = close_rx.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(stop).await;
                    return;
                }
            }
        }
    }
}

/// One `Ingest` call with the pre-encoded events.
async fn ingest(
    inner: &Inner,
    pending: &[Pending],
    timeout: Duration,
) -> Result<pb::IngestResponse, tonic::Status> {
    let size = pending.iter().map(|p| p.entry.len()).sum();
    let mut body = BytesMut::with_capacity(size);
    for p in pending {
        body.put_slice(&p.entry);
    }
    let mut request = inner.key.request(body.freeze());
    request.set_timeout(timeout);
    let mut grpc = tonic::client::Grpc::new(inner.channel.clone());
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("not connected: {e}")))?;
        grpc.unary(
            request,
            http::uri::PathAndQuery::from_static("/picket.v1.IngestService/Ingest"),
            PreEncoded,
        )
        .await
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("ingest call timed out")),
    }
}

/// Sends an already encoded `IngestRequest` (the concatenated
/// `events` entries) and decodes the `IngestResponse`.
struct PreEncoded;

impl tonic::codec::Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = pb::IngestResponse;
    type Encoder = BytesEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::IngestResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct BytesEncoder;

impl tonic::codec::Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClientConfig {
        ClientConfig {
            flush_interval: Duration::from_secs(3600),
            max_queue_size: 3,
            ..ClientConfig::new("pk_0000000000000000_x", "http://127.0.0.1:9")
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_new_event_and_counts_it() {
        let dropped = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = dropped.clone();
        let client = TelemetryClient::new(ClientConfig {
            on_drop: Some(Arc::new(move |reason, events| {
                seen.lock().unwrap().push((reason, events.len()));
            })),
            ..config()
        })
        .unwrap();
        for i in 0..5 {
            assert_eq!(
                client.enqueue_event(ActivityEvent::new("t").actor(format!("a{i}"))),
                i < 3
            );
        }
        let stats = client.stats();
        assert_eq!(
            (stats.enqueued, stats.buffered, stats.dropped.queue_full),
            (3, 3, 2)
        );
        assert_eq!(
            dropped.lock().unwrap().as_slice(),
            &[(DropReason::QueueFull, 1), (DropReason::QueueFull, 1)]
        );
        let stats = client.close_within(Duration::from_millis(100)).await;
        assert_eq!(stats.dropped.shutdown_deadline, 3);
        assert_eq!(stats.buffered, 0);
        assert!(!client.enqueue_event(ActivityEvent::new("late")));
        assert_eq!(client.stats().dropped.shutdown_deadline, 4);
    }

    #[test]
    fn building_outside_a_runtime_is_an_error() {
        assert!(matches!(
            TelemetryClient::new(config()),
            Err(ClientError::NoRuntime)
        ));
    }

    #[tokio::test]
    async fn generated_keys_are_unique_and_defaults_filled() {
        let client = TelemetryClient::new(ClientConfig {
            service_name: "svc".into(),
            ..config()
        })
        .unwrap();
        client.enqueue_event(ActivityEvent::new("a"));
        client.enqueue_event(ActivityEvent::new("b").idempotency_key("mine"));
        let state = lock(&client.inner.state);
        let keys: Vec<_> = state
            .queue
            .iter()
            .map(|e| e.idempotency_key.clone())
            .collect();
        assert_eq!(keys[1], "mine");
        assert_eq!(keys[0].len(), 34);
        assert!(state.queue.iter().all(|e| e.service == "svc"
            && e.source_system == SOURCE_SYSTEM
            && e.occurred_at.is_some()));
    }
}
