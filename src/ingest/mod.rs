//! The ingest write path.
//!
//! Handlers validate events, reserve room with [`IngestWriter::try_reserve`]
//! (server-wide backpressure), and hand them to [`IngestWriter::write`]. A small
//! pool of writer tasks takes whatever batches are queued (up to
//! `max_batch_rows` rows), writes them in ONE transaction, and only after the
//! commit replies to each waiting handler, bumps the commit counter that live
//! tails wait on, and tells the detection pipeline's bounded broadcast which
//! tenant has new events. If that consumer lags, it is told how many it missed and
//! re-reads them from the store; ingest never waits for it.

pub mod retention;
pub mod signal;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::domain::TenantId;
use crate::domain::event::{InsertOutcome, NewEvent};
use crate::error::{AppError, AppResult};
use crate::ingest::signal::Signal;
use crate::storage::{Store, StoreError};

/// Tuning of the write path.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Concurrent writer tasks (transactions in flight).
    pub writers: usize,
    /// Most rows one transaction takes from the queue.
    pub max_batch_rows: usize,
    /// Most events accepted for writing but not yet committed, server-wide.
    pub max_in_flight_events: usize,
    /// Capacity of the post-commit hand-off to the detection pipeline, in batches.
    pub handoff_capacity: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            writers: 2,
            max_batch_rows: 2000,
            max_in_flight_events: 100_000,
            handoff_capacity: 1024,
        }
    }
}

/// Notice that a tenant has newly committed events. Consumers read the events
/// themselves from the store's feed (the source of truth), so the notice
/// carries no event data and costs the write path no copies.
#[derive(Debug)]
pub struct CommittedEvents {
    /// Their tenant.
    pub tenant: TenantId,
    /// How many new events were committed (0 when a peer relayed the notice).
    pub accepted: usize,
    /// Another replica committed them (relayed by [`crate::cluster::replicas`]); such
    /// notices are never published back to the peers.
    pub from_peer: bool,
}

/// The commit notices of the write path: detection subscribes to them, and
/// the replica bridge publishes the local ones and injects peers' (see
/// [`crate::cluster::replicas`]).
#[derive(Clone)]
pub struct CommitNotices {
    commits: Arc<Signal>,
    handoff: broadcast::Sender<Arc<CommittedEvents>>,
}

impl CommitNotices {
    /// Tenants that gained events on a peer; `None`: anything may have changed
    /// (after a reconnect), so only the tails are woken and detection catches
    /// up on its next poll.
    pub fn wake(&self, tenants: Option<&[TenantId]>) {
        let Some(tenants) = tenants else {
            self.commits.wake_all();
            return;
        };
        for tenant in tenants {
            self.commits.wake(*tenant);
            if self.handoff.receiver_count() > 0 {
                let _ = self.handoff.send(Arc::new(CommittedEvents {
                    tenant: *tenant,
                    accepted: 0,
                    from_peer: true,
                }));
            }
        }
    }

    /// Commit notices, local and relayed (the detection pipeline's feed; the
    /// bridge publishes the local ones).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CommittedEvents>> {
        self.handoff.subscribe()
    }
}

/// One handler's batch waiting to be written.
struct WriteJob {
    /// The batch's tenant.
    tenant: TenantId,
    /// Its validated events.
    events: Vec<NewEvent>,
    /// Where the outcome goes after commit.
    reply: oneshot::Sender<AppResult<Vec<InsertOutcome>>>,
    /// Room reserved for it; released when the job is done.
    _permit: OwnedSemaphorePermit,
    /// When it was queued (for the queue-wait metric).
    queued_at: Instant,
}

/// Handle to the write path; cheap to clone.
#[derive(Clone)]
pub struct IngestWriter {
    /// Queue to the writer tasks.
    jobs: mpsc::Sender<WriteJob>,
    /// Bumped per tenant after each commit; tails wait on it.
    commits: Arc<Signal>,
    /// Post-commit hand-off to the detection pipeline.
    handoff: broadcast::Sender<Arc<CommittedEvents>>,
    /// Server-wide room for events in flight.
    room: Arc<Semaphore>,
    /// The limit behind `room`, for messages.
    max_in_flight: usize,
}

impl IngestWriter {
    /// Starts `config.writers` writer tasks on `tracker`. They run until every
    /// handle is dropped and the queue is drained, so in-flight writes commit
    /// during shutdown.
    pub fn start(store: Arc<dyn Store>, config: WriterConfig, tracker: &TaskTracker) -> Self {
        let (jobs, rx) = mpsc::channel::<WriteJob>(config.max_in_flight_events.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let commits = Arc::new(Signal::new());
        let (handoff, _) = broadcast::channel(config.handoff_capacity.max(1));
        for _ in 0..config.writers.max(1) {
            tracker.spawn(writer_loop(
                store.clone(),
                rx.clone(),
                config.max_batch_rows.max(1),
                commits.clone(),
                handoff.clone(),
            ));
        }
        Self {
            jobs,
            commits,
            handoff,
            room: Arc::new(Semaphore::new(config.max_in_flight_events.max(1))),
            max_in_flight: config.max_in_flight_events,
        }
    }

    /// Reserves room for `n` events or fails at once with RESOURCE_EXHAUSTED
    /// (with RetryInfo) when the server already holds its limit in flight.
    pub fn try_reserve(&self, n: usize) -> AppResult<OwnedSemaphorePermit> {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        self.room.clone().try_acquire_many_owned(n32).map_err(|_| {
            metrics::counter!("picket_ingest_overloaded_total").increment(1);
            AppError::ResourceExhausted {
                message: format!(
                    "ingest is at capacity ({} events in flight); retry after the advised delay",
                    self.max_in_flight
                ),
                retry_after: Duration::from_millis(200),
            }
        })
    }

    /// Writes one tenant's batch; resolves after it is durably committed.
    pub async fn write(
        &self,
        tenant: TenantId,
        events: Vec<NewEvent>,
        permit: OwnedSemaphorePermit,
    ) -> AppResult<Vec<InsertOutcome>> {
        let (reply, rx) = oneshot::channel();
        let job = WriteJob {
            tenant,
            events,
            reply,
            _permit: permit,
            queued_at: Instant::now(),
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| AppError::Unavailable {
                message: "the server is shutting down".into(),
                retry_after: Duration::from_secs(1),
            })?;
        rx.await.map_err(|_| AppError::Unavailable {
            message: "the write was interrupted; resend the batch".into(),
            retry_after: Duration::from_secs(1),
        })?
    }

    /// A receiver that changes after every commit of `tenant`'s events.
    pub fn commits(&self, tenant: TenantId) -> watch::Receiver<u64> {
        self.commits.subscribe(tenant)
    }

    /// Commit notices: what detection follows and the replica bridge relays.
    pub fn notices(&self) -> CommitNotices {
        CommitNotices {
            commits: self.commits.clone(),
            handoff: self.handoff.clone(),
        }
    }
}

async fn writer_loop(
    store: Arc<dyn Store>,
    rx: Arc<Mutex<mpsc::Receiver<WriteJob>>>,
    max_rows: usize,
    commits: Arc<Signal>,
    handoff: broadcast::Sender<Arc<CommittedEvents>>,
) {
    loop {
        // Take the first queued job, then whatever else is already queued.
        let jobs = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { break };
            let mut rows = first.events.len();
            let mut jobs = vec![first];
            while rows < max_rows {
                match rx.try_recv() {
                    Ok(job) => {
                        rows += job.events.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            jobs
        };
        write_jobs(store.as_ref(), jobs, &commits, &handoff).await;
    }
}

/// Writes jobs in one transaction and answers each after the commit.
async fn write_jobs(
    store: &dyn Store,
    jobs: Vec<WriteJob>,
    commits: &Signal,
    handoff: &broadcast::Sender<Arc<CommittedEvents>>,
) {
    let mut batches = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    for job in jobs {
        metrics::histogram!("picket_ingest_queue_wait_seconds")
            .record(job.queued_at.elapsed().as_secs_f64());
        batches.push((job.tenant, job.events));
        replies.push((job.reply, job._permit));
    }
    let refs: Vec<(TenantId, &[NewEvent])> =
        batches.iter().map(|(t, e)| (*t, e.as_slice())).collect();
    let results = commit_batches(store, &refs).await;
    // Wake-ups and hand-off per tenant, once per commit round.
    let mut accepted: Vec<(TenantId, usize)> = Vec::new();
    for ((tenant, _), result) in refs.iter().zip(&results) {
        let Ok(outcomes) = result else { continue };
        let n = outcomes
            .iter()
            .filter(|o| matches!(o, InsertOutcome::Accepted(_)))
            .count();
        metrics::counter!("picket_ingest_events_total", "outcome" => "accepted")
            .increment(n as u64);
        metrics::counter!("picket_ingest_events_total", "outcome" => "duplicate")
            .increment((outcomes.len() - n) as u64);
        match accepted.iter_mut().find(|(t, _)| t == tenant) {
            Some((_, total)) => *total += n,
            None => accepted.push((*tenant, n)),
        }
    }
    for (tenant, n) in accepted {
        commits.wake(tenant);
        if n > 0 && handoff.receiver_count() > 0 {
            let _ = handoff.send(Arc::new(CommittedEvents {
                tenant,
                accepted: n,
                from_peer: false,
            }));
        }
    }
    metrics::gauge!("picket_ingest_handoff_queue_batches").set(handoff.len() as f64);
    for ((reply, _permit), result) in replies.into_iter().zip(results) {
        let _ = reply.send(result);
    }
}

/// Commits callers' batches (each a tenant and its events) in ONE transaction
/// and returns each batch's outcomes, in order.
///
/// A batch's own data must never fail another caller's batch: when the
/// database refuses the data of the grouped transaction (a constraint, a value
/// it cannot store; see [`StoreError::is_refused_data`]), each batch is
/// committed apart, one transaction each, so only the batch at fault fails.
/// Such a batch is answered INTERNAL without RetryInfo (resending it would
/// fail the same way; the log names the database's reason under the request
/// id); a failure outside the data (connection, shutdown) is answered
/// UNAVAILABLE with RetryInfo, as before.
pub async fn commit_batches(
    store: &dyn Store,
    batches: &[(TenantId, &[NewEvent])],
) -> Vec<AppResult<Vec<InsertOutcome>>> {
    let rows: usize = batches.iter().map(|(_, e)| e.len()).sum();
    let started = Instant::now();
    let result = insert_grouped(store, batches).await;
    metrics::histogram!("picket_ingest_commit_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("picket_ingest_transaction_rows").record(rows as f64);
    let e = match result {
        Ok(per_batch) => return per_batch.into_iter().map(Ok).collect(),
        Err(e) => e,
    };
    metrics::counter!("picket_ingest_failed_transactions_total").increment(1);
    if let StoreError::Full(cause) = &e {
        metrics::counter!("picket_ingest_disk_full_total").increment(1);
        tracing::error!(error = %format_args!("{cause:#}"), rows, "ingest refused: the store is out of disk space");
        return batches.iter().map(|_| Err(AppError::disk_full())).collect();
    }
    let refused = e.is_refused_data();
    // The cause chain on one line: the database's reason, never event contents.
    tracing::error!(
        error = %format_args!("{:#}", anyhow::Error::new(e)),
        rows,
        batches = batches.len(),
        refused_data = refused,
        "failed to commit an ingest transaction"
    );
    if !refused {
        return batches.iter().map(|_| Err(unavailable())).collect();
    }
    if batches.len() == 1 {
        return vec![Err(refused_batch())];
    }
    let mut out = Vec::with_capacity(batches.len());
    for batch in batches {
        out.push(
            match insert_grouped(store, std::slice::from_ref(batch)).await {
                Ok(mut one) => Ok(one.swap_remove(0)),
                Err(e) => {
                    let refused = e.is_refused_data();
                    tracing::error!(
                        error = %format_args!("{:#}", anyhow::Error::new(e)),
                        tenant = %batch.0,
                        rows = batch.1.len(),
                        refused_data = refused,
                        "failed to commit an ingest batch on its own"
                    );
                    Err(if refused {
                        refused_batch()
                    } else {
                        unavailable()
                    })
                }
            },
        );
    }
    out
}

/// The batches in one transaction, each tenant's events in one statement;
/// the outcomes split back per batch.
async fn insert_grouped(
    store: &dyn Store,
    batches: &[(TenantId, &[NewEvent])],
) -> Result<Vec<Vec<InsertOutcome>>, StoreError> {
    let mut order: Vec<TenantId> = Vec::new();
    let mut by_tenant: HashMap<TenantId, Vec<NewEvent>> = HashMap::new();
    let mut spans = Vec::with_capacity(batches.len()); // (tenant, start, len) per batch
    for (tenant, events) in batches {
        let list = by_tenant.entry(*tenant).or_insert_with(|| {
            order.push(*tenant);
            Vec::new()
        });
        spans.push((*tenant, list.len(), events.len()));
        list.extend_from_slice(events);
    }
    let groups: Vec<(TenantId, &[NewEvent])> = order
        .iter()
        .map(|t| (*t, by_tenant[t].as_slice()))
        .collect();
    let outcomes = store.insert_events(&groups).await?;
    let per_tenant: HashMap<TenantId, Vec<InsertOutcome>> =
        order.iter().copied().zip(outcomes).collect();
    Ok(spans
        .into_iter()
        .map(|(tenant, start, len)| per_tenant[&tenant][start..start + len].to_vec())
        .collect())
}

/// A failure outside the data: resend later.
fn unavailable() -> AppError {
    AppError::Unavailable {
        message: "the batch could not be stored; resend it".into(),
        retry_after: Duration::from_millis(500),
    }
}

/// The database refused this batch's own data: resending it cannot help.
fn refused_batch() -> AppError {
    AppError::Internal(anyhow::anyhow!(
        "the database refused an ingest batch that passed validation (see the error logged just before)"
    ))
}
