//! Alert raising off the evaluation path: the pipeline hands each detection
//! (or ready anomaly alert) to a bounded queue and goes on evaluating; one
//! writer task takes whatever is queued (up to [`BATCH`]) and raises it per
//! tenant (in parts of at most [`EVIDENCE_PER_RAISE`] evidence events) with
//! one evidence read, one alert transaction
//! ([`crate::storage::AlertStore::raise_alerts`]) and one incident
//! correlation pass ([`crate::incidents::correlate_batch`]).
//!
//! The queue is bounded ([`QUEUE`]): when it is full the pipeline waits
//! (backpressure), nothing is dropped. Jobs are raised in the order they were
//! queued, so folding and the change log see exactly the order evaluation
//! produced. A failed write is retried (with backoff) until it succeeds or
//! the pipeline stops; detections still queued when the process dies are
//! raised again by the next leader's replay (see the pipeline's module docs).
//! [`Raiser::flush`] waits until everything queued before it is committed.
//!
//! Reading evidence and raising overlap: the writer task reads a part's
//! evidence and hands the part to a committer task ([`PREPARED_QUEUE`]),
//! which runs the alert transactions one at a time in the writer's order, so
//! the next part's evidence is read while the current part's transaction
//! runs (in an alert storm the two stages took about as long as each other).
//!
//! Incident correlation runs on a task of its own behind raising (a bounded
//! queue of [`CORRELATE_QUEUE`] batches, in raising order): a new alert reaches
//! its watchers as soon as its raise commits, not after the correlation of
//! every batch before it (in an alert storm correlation took as long as
//! raising, and an administrator's brute force waited behind both). A flush
//! passes through the correlator too, so it still waits for the incidents.
//!
//! Fencing: when this replica loses its detection shards without stopping
//! (its lock connection failed), other replicas take them over and raise by
//! replay what was detected here but not committed. The writer then drops
//! what is still queued instead of committing it late ([`RaiserConfig::fence`]),
//! so at worst a write already under way folds into the same alert.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::detect::Detection;
use crate::domain::TenantId;
use crate::domain::alert::{Entity, EntityKind, Evidence, NewAlert, SourceKind};
use crate::domain::event::NewEvent;
use crate::incidents::CorrelationConfig;
use crate::storage::{Store, StoreResult};

/// Jobs the queue holds before evaluation waits.
pub const QUEUE: usize = 10_000;
/// Most jobs raised in one batch.
pub const BATCH: usize = 1_000;
/// Most evidence ids read in one query.
const EVIDENCE_READ: usize = 2_000;
/// Most evidence events (snapshots) in one raise.
const EVIDENCE_PER_RAISE: usize = 10_000;
/// Most entities named on one alert.
const MAX_ENTITIES: usize = 20;
/// Evidence events the writer keeps from its reads, per generation (two
/// generations; an event snapshot is ~0.5–1 KB). 10,000 held ~8 MiB more at
/// the end of a fresh-IP storm, with the writer's evidence stage no faster
/// (docs/PERFORMANCE.md), and that memory is what the 300 MB budget lacked.
const RECENT: usize = 5_000;
/// Parts whose evidence is read, waiting for their raise, before the
/// evidence reads wait (one: a part holds up to [`EVIDENCE_PER_RAISE`]
/// event snapshots, so at most three are in memory, one being read, one
/// waiting, one being raised).
const PREPARED_QUEUE: usize = 1;
/// Raised batches waiting for correlation before raising waits. The batches
/// hold alerts without their evidence (a few KB each); 8 let a burst of
/// new incidents (a fresh-IP storm) stop raising for seconds once evidence
/// reads and raises overlapped, and the correlator merges what is queued.
const CORRELATE_QUEUE: usize = 64;

/// What the correlator does, in order.
enum Correlate {
    /// Group a tenant's new alerts into incidents.
    Alerts(TenantId, Vec<crate::domain::alert::Alert>),
    /// Answered once everything before it is correlated.
    Flush(oneshot::Sender<()>),
}

/// What the writer raises.
pub(crate) enum Job {
    /// A rule detection; its evidence is read by the writer.
    Rule {
        tenant: TenantId,
        detection: Detection,
        /// When the event that completed it was received (live only).
        received_at: Option<DateTime<Utc>>,
    },
    /// An alert already built (anomaly windows); evidence without a
    /// snapshot is read by the writer with its batch.
    Ready { tenant: TenantId, alert: NewAlert },
    /// Answered once every job queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// The queue's sending side, held by the pipeline.
pub(crate) struct Raiser {
    /// Jobs with the moment they were queued.
    tx: mpsc::Sender<(Instant, Job)>,
}

/// What the writer needs.
pub(crate) struct RaiserConfig {
    pub store: Arc<dyn Store>,
    pub changes: Arc<crate::ingest::signal::Signal>,
    pub suppression: chrono::Duration,
    pub correlation: CorrelationConfig,
    /// Stops retrying a failed write.
    pub shutdown: CancellationToken,
    /// Cancelled when this replica lost its shards: queued jobs are dropped.
    pub fence: CancellationToken,
}

impl Raiser {
    /// Starts the writer task; it ends once every `Raiser` is dropped and the
    /// queue is drained.
    pub(crate) fn spawn(config: RaiserConfig) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let config = Arc::new(config);
        let (ctx, crx) = mpsc::channel(CORRELATE_QUEUE);
        let (rtx, rrx) = mpsc::channel(PREPARED_QUEUE);
        tokio::spawn(correlate(config.clone(), crx));
        tokio::spawn(commit(config.clone(), rrx, ctx));
        tokio::spawn(write(config, rx, rtx));
        Self { tx }
    }

    /// Queues a job, waiting while the queue is full.
    pub(crate) async fn send(&self, job: Job) {
        if self.tx.capacity() == 0 {
            metrics::counter!("picket_alert_queue_full_total").increment(1);
        }
        if self.tx.send((Instant::now(), job)).await.is_err() {
            tracing::error!("the alert writer stopped; detection dropped");
        }
        self.gauge();
    }

    /// Waits until everything queued so far is committed (or given up at shutdown).
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((Instant::now(), Job::Flush(tx))).await.is_ok() {
            let _ = rx.await;
        }
        self.gauge();
    }

    fn gauge(&self) {
        let depth = self.tx.max_capacity() - self.tx.capacity();
        metrics::gauge!("picket_alert_queue_depth").set(depth as f64);
    }
}

/// The correlator task: groups raised alerts into incidents, in raising
/// order, until the writer stops.
async fn correlate(config: Arc<RaiserConfig>, mut rx: mpsc::Receiver<Correlate>) {
    let mut buf = Vec::with_capacity(CORRELATE_QUEUE);
    while rx.recv_many(&mut buf, CORRELATE_QUEUE).await > 0 {
        // Behind the writer (a storm), consecutive batches of one tenant are
        // correlated as one: one candidate read and one save per incident
        // for all of them instead of per batch, in the same order.
        let mut jobs: Vec<Correlate> = Vec::with_capacity(buf.len());
        for job in buf.drain(..) {
            let same = matches!(
                (jobs.last(), &job),
                (Some(Correlate::Alerts(t, _)), Correlate::Alerts(u, _)) if t == u
            );
            match (jobs.last_mut(), job) {
                (Some(Correlate::Alerts(_, into)), Correlate::Alerts(_, more)) if same => {
                    into.extend(more);
                }
                (_, job) => jobs.push(job),
            }
        }
        for job in jobs {
            correlate_one(&config, job).await;
        }
    }
}

/// Does one correlator job.
async fn correlate_one(config: &RaiserConfig, job: Correlate) {
    match job {
        Correlate::Flush(tx) => {
            let _ = tx.send(());
        }
        Correlate::Alerts(tenant, new) => {
            let correlating = Instant::now();
            match crate::incidents::correlate_batch(
                config.store.as_ref(),
                tenant,
                &new,
                config.correlation,
                Utc::now(),
            )
            .await
            {
                // The incident changes are committed: wake their watchers
                // (and the playbook triggers) now rather than at their next poll.
                Ok(grouped) if grouped > 0 => config.changes.notify(tenant),
                Ok(_) => {}
                // The alerts stay; the next leader's start correlates
                // alerts left without an incident.
                Err(e) => {
                    tracing::error!(tenant_id = %tenant, alerts = new.len(), error = %e, "incident correlation failed")
                }
            }
            metrics::histogram!("picket_incident_correlation_duration_seconds")
                .record(correlating.elapsed().as_secs_f64());
        }
    }
}

/// The writer task: raises queued jobs in batches until the queue closes.
async fn write(
    config: Arc<RaiserConfig>,
    mut rx: mpsc::Receiver<(Instant, Job)>,
    committer: mpsc::Sender<Step>,
) {
    let mut buf = Vec::with_capacity(BATCH);
    let mut recent = Recent::default();
    while rx.recv_many(&mut buf, BATCH).await > 0 {
        let mut flushes = Vec::new();
        // Per tenant, in queue order.
        let mut tenants: Vec<(TenantId, Vec<Job>)> = Vec::new();
        for (queued, job) in buf.drain(..) {
            let tenant = match &job {
                Job::Flush(_) => {
                    if let Job::Flush(tx) = job {
                        flushes.push(tx);
                    }
                    continue;
                }
                Job::Rule { tenant, .. } | Job::Ready { tenant, .. } => *tenant,
            };
            // How long the detection waited in the queue for the writer (the
            // part of an alert's delay between evaluation and its raise).
            metrics::histogram!("picket_alert_queue_wait_seconds")
                .record(queued.elapsed().as_secs_f64());
            match tenants.iter_mut().find(|(t, _)| *t == tenant) {
                Some((_, jobs)) => jobs.push(job),
                None => tenants.push((tenant, vec![job])),
            }
        }
        for (tenant, jobs) in tenants {
            if config.fence.is_cancelled() {
                metrics::counter!("picket_alert_jobs_fenced_total").increment(jobs.len() as u64);
                tracing::warn!(tenant_id = %tenant, jobs = jobs.len(), "detection shards lost: queued alerts dropped (the new leader's replay raises them)");
                continue;
            }
            raise_tenant(&config, &committer, &mut recent, tenant, jobs).await;
        }
        metrics::gauge!("picket_alert_queue_depth").set(rx.len() as f64);
        // Answered by the correlator once the batches before are raised and
        // correlated.
        for f in flushes {
            if let Err(mpsc::error::SendError(Step::Flush(f))) =
                committer.send(Step::Flush(f)).await
            {
                let _ = f.send(());
            }
        }
    }
}

/// What the committer does, in order.
enum Step {
    /// Raise a part whose evidence the writer has read.
    Part(Prepared),
    /// Passed on to the correlator once every part before it is raised.
    Flush(oneshot::Sender<()>),
}

/// A part of one tenant's jobs, ready to raise.
struct Prepared {
    tenant: TenantId,
    alerts: Vec<NewAlert>,
    meta: Vec<Meta>,
    /// How long reading its evidence took.
    evidence: Duration,
}

/// The committer task: raises the parts the writer prepared, one at a time
/// in the writer's order, and hands new alerts to the correlator. It runs
/// beside the writer, so the evidence of the next part is read while this
/// one's transaction runs (in a storm the two took about as long as each
/// other, one after the other).
async fn commit(
    config: Arc<RaiserConfig>,
    mut rx: mpsc::Receiver<Step>,
    correlator: mpsc::Sender<Correlate>,
) {
    while let Some(step) = rx.recv().await {
        match step {
            Step::Part(part) => {
                if config.fence.is_cancelled() {
                    metrics::counter!("picket_alert_jobs_fenced_total")
                        .increment(part.alerts.len() as u64);
                    tracing::warn!(tenant_id = %part.tenant, jobs = part.alerts.len(), "detection shards lost: prepared alerts dropped (the new leader's replay raises them)");
                    continue;
                }
                commit_part(&config, &correlator, part).await;
            }
            Step::Flush(f) => {
                if let Err(mpsc::error::SendError(Correlate::Flush(f))) =
                    correlator.send(Correlate::Flush(f)).await
                {
                    let _ = f.send(());
                }
            }
        }
    }
}

/// Evidence events the writer read lately, by (tenant, id), in two
/// generations of at most [`RECENT`] each: when the newer one is full it
/// becomes the older one and the older one is dropped, so what was not used
/// for a generation leaves (an approximate least-recently-used set with no
/// per-entry bookkeeping; events never change once stored, so an entry is
/// never stale). Hand-written because the writer needs only this and the
/// bound; a general cache crate would bring its own task or locks.
#[derive(Default)]
struct Recent {
    new: HashMap<(TenantId, uuid::Uuid), NewEvent>,
    old: HashMap<(TenantId, uuid::Uuid), NewEvent>,
}

impl Recent {
    fn get(&self, tenant: TenantId, id: &uuid::Uuid) -> Option<&NewEvent> {
        let key = (tenant, *id);
        self.new.get(&key).or_else(|| self.old.get(&key))
    }

    fn put(&mut self, tenant: TenantId, e: NewEvent) {
        if self.new.len() >= RECENT {
            self.old = std::mem::take(&mut self.new);
        }
        self.new.insert((tenant, e.id), e);
    }
}

/// Retries `op` with backoff until it succeeds or shutdown; `None` at shutdown.
async fn retrying<T, F, Fut>(config: &RaiserConfig, what: &str, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                metrics::counter!("picket_alert_write_errors_total").increment(1);
                tracing::error!(error = ?anyhow::Error::from(e), what, "alert writer: store call failed; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = config.shutdown.cancelled() => {
                tracing::warn!(what, "alert writer stopped while retrying; the next start's replay raises what was lost");
                return None;
            }
            () = config.fence.cancelled() => {
                tracing::warn!(what, "alert writer fenced while retrying; the new leader's replay raises what was lost");
                return None;
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// What the writer remembers about a job for metrics and logs.
struct Meta {
    source: &'static str,
    rule: String,
    received_at: Option<DateTime<Utc>>,
}

/// Evidence ids a job has the writer read.
fn evidence_of(job: &Job) -> Box<dyn Iterator<Item = uuid::Uuid> + '_> {
    match job {
        Job::Rule { detection, .. } => Box::new(detection.evidence.iter().copied()),
        Job::Ready { alert, .. } => Box::new(
            alert
                .evidence
                .iter()
                .filter(|e| e.snapshot.is_none())
                .map(|e| e.event_id),
        ),
        Job::Flush(_) => Box::new(std::iter::empty()),
    }
}

/// Raises one tenant's jobs of a batch, in order, in parts of at most
/// [`EVIDENCE_PER_RAISE`] evidence events each (a storm's alerts carry up to
/// 100 event snapshots each: this bounds what one raise holds in memory).
async fn raise_tenant(
    config: &RaiserConfig,
    committer: &mpsc::Sender<Step>,
    recent: &mut Recent,
    tenant: TenantId,
    jobs: Vec<Job>,
) {
    let mut part = Vec::new();
    let mut weight = 0;
    for job in jobs {
        let w = evidence_of(&job).count().max(1);
        if !part.is_empty() && weight + w > EVIDENCE_PER_RAISE {
            raise_part(config, committer, recent, tenant, std::mem::take(&mut part)).await;
            weight = 0;
        }
        weight += w;
        part.push(job);
    }
    if !part.is_empty() {
        raise_part(config, committer, recent, tenant, part).await;
    }
}

/// Reads the evidence of a part of one tenant's jobs and hands the part to
/// the committer.
async fn raise_part(
    config: &RaiserConfig,
    committer: &mpsc::Sender<Step>,
    recent: &mut Recent,
    tenant: TenantId,
    jobs: Vec<Job>,
) {
    let started = Instant::now();
    // Evidence for every job of the part, read in as few queries as possible.
    let mut ids: Vec<uuid::Uuid> = Vec::new();
    let mut seen = HashSet::new();
    for job in &jobs {
        ids.extend(evidence_of(job).filter(|id| seen.insert(*id)));
    }
    let mut by_id: HashMap<uuid::Uuid, NewEvent> = HashMap::with_capacity(ids.len());
    // Events read for earlier parts: a storm's detections name the same
    // events again and again (each failure of a sliding window is evidence of
    // the detections after it), so most are here.
    let cached = ids.len();
    ids.retain(|id| match recent.get(tenant, id) {
        Some(e) => {
            by_id.insert(*id, e.clone());
            false
        }
        None => true,
    });
    metrics::counter!("picket_alert_evidence_reads_total", "from" => "cache")
        .increment((cached - ids.len()) as u64);
    metrics::counter!("picket_alert_evidence_reads_total", "from" => "store")
        .increment(ids.len() as u64);
    // By id only. A bound on when the evidence occurred (the part's first
    // to last sighting) would let Postgres visit only those days'
    // partitions, but during a storm the statistics of today's partition
    // lag behind ingest: the planner then estimated a few rows in the
    // bound, walked the time index over the whole span and filtered by id
    // (114,000 rows read for 92, 150–440 ms a read, 28 s of a storm;
    // issue 12). By id, each read probes the id index of every partition:
    // 1.4–2.6 ms for 92 ids over 36 partitions.
    for chunk in ids.chunks(EVIDENCE_READ) {
        let Some(found) = retrying(config, "evidence", || {
            config.store.get_events(tenant, chunk)
        })
        .await
        else {
            return;
        };
        by_id.extend(found.into_iter().map(|e| (e.event.id, e.event)));
    }
    for id in &ids {
        if let Some(e) = by_id.get(id) {
            recent.put(tenant, e.clone());
        }
    }
    stage("evidence", started);
    let mut alerts = Vec::with_capacity(jobs.len());
    let mut meta = Vec::with_capacity(jobs.len());
    for job in jobs {
        match job {
            Job::Rule {
                detection,
                received_at,
                ..
            } => {
                meta.push(Meta {
                    source: "rule",
                    rule: detection.rule_id.clone(),
                    received_at,
                });
                alerts.push(rule_alert(detection, &by_id));
            }
            Job::Ready { mut alert, .. } => {
                for e in alert.evidence.iter_mut().filter(|e| e.snapshot.is_none()) {
                    e.snapshot = by_id.get(&e.event_id).cloned();
                }
                meta.push(Meta {
                    source: "model",
                    rule: alert.source_name.clone(),
                    received_at: None,
                });
                alerts.push(alert);
            }
            Job::Flush(_) => {}
        }
    }
    let part = Prepared {
        tenant,
        alerts,
        meta,
        evidence: started.elapsed(),
    };
    if committer.send(Step::Part(part)).await.is_err() {
        tracing::error!(tenant_id = %tenant, "the alert committer stopped; detection dropped");
    }
}

/// Raises a prepared part and hands the new alerts to the correlator.
async fn commit_part(config: &RaiserConfig, correlator: &mpsc::Sender<Correlate>, part: Prepared) {
    let Prepared {
        tenant,
        alerts,
        meta,
        evidence,
    } = part;
    let raising = Instant::now();
    let Some(raised) = retrying(config, "alerts", || {
        config
            .store
            .raise_alerts(tenant, alerts.clone(), config.suppression, Utc::now())
    })
    .await
    else {
        return;
    };
    stage("raise", raising);
    config.changes.notify(tenant);
    let committed = Utc::now();
    for ((alert, created), m) in raised.iter().zip(&meta) {
        metrics::counter!("picket_alerts_raised_total", "source" => m.source, "new" => if *created { "true" } else { "false" })
            .increment(1);
        if let Some(at) = m.received_at {
            let lag = (committed - at).to_std().unwrap_or_default();
            metrics::histogram!("picket_detect_latency_seconds").record(lag.as_secs_f64());
        }
        tracing::info!(
            tenant_id = %tenant, alert_id = %alert.id, rule = %m.rule, created = *created,
            occurrences = alert.occurrence_count, "alert raised"
        );
    }
    // The writer's work on the part: its evidence read plus its raise (not
    // the wait between them for the part before).
    metrics::histogram!("picket_alert_write_duration_seconds")
        .record((evidence + raising.elapsed()).as_secs_f64());
    // The new alerts go to the correlator without their evidence snapshots
    // (correlation reads entities, times and severity; links are by id), so
    // what waits there stays small.
    let new: Vec<_> = raised
        .into_iter()
        .filter_map(|(a, created)| created.then_some(a))
        .map(|mut a| {
            a.body.evidence.clear();
            a
        })
        .collect();
    let handing = Instant::now();
    if !new.is_empty()
        && correlator
            .send(Correlate::Alerts(tenant, new))
            .await
            .is_err()
    {
        tracing::error!(tenant_id = %tenant, "the incident correlator stopped; the next start correlates these alerts");
    }
    stage("handoff", handing);
}

/// Records the seconds since `since` in `picket_alert_write_stage_seconds`:
/// `evidence` (reading the part's evidence), `raise` (the alert transaction,
/// retries included), `handoff` (waiting for room in the correlator's queue).
fn stage(name: &'static str, since: Instant) {
    metrics::histogram!("picket_alert_write_stage_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}

/// The alert a rule detection raises: its evidence with snapshots, and the
/// rule's entities plus the actors and IPs of its evidence.
fn rule_alert(d: Detection, by_id: &HashMap<uuid::Uuid, NewEvent>) -> NewAlert {
    let mut entities = d.entities.clone();
    for id in &d.evidence {
        let Some(e) = by_id.get(id) else { continue };
        let found = [
            (!e.actor.is_empty()).then(|| Entity::new(EntityKind::Actor, e.actor.clone())),
            e.source_ip
                .map(|ip| Entity::new(EntityKind::Ip, ip.to_string())),
        ];
        for ent in found.into_iter().flatten() {
            if entities.len() < MAX_ENTITIES && !entities.contains(&ent) {
                entities.push(ent);
            }
        }
    }
    entities.sort();
    let evidence = d
        .evidence
        .iter()
        .map(|id| Evidence {
            event_id: *id,
            snapshot: by_id.get(id).cloned(),
        })
        .collect();
    NewAlert {
        title: d.rule_title,
        summary: d.summary,
        severity: d.severity,
        category: d.category,
        source_kind: SourceKind::Rule,
        source_name: d.rule_id,
        anomaly_score: 0.0,
        anomaly_threshold: 0.0,
        entities,
        evidence,
        features: Vec::new(),
        attack_techniques: d.attack_techniques,
        first_seen: d.first_seen,
        last_seen: d.last_seen,
        fingerprint: d.fingerprint,
        raw: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_events_keep_two_generations_per_tenant() {
        let a = TenantId(uuid::Uuid::now_v7());
        let b = TenantId(uuid::Uuid::now_v7());
        let mut r = Recent::default();
        let first = crate::detect::testing::event("user.login");
        r.put(a, first.clone());
        assert_eq!(r.get(a, &first.id), Some(&first));
        // Keyed by tenant: another tenant naming the id finds nothing.
        assert_eq!(r.get(b, &first.id), None);
        // A full generation becomes the older one: `first` is still there
        // until a second generation fills up after it.
        let fill = |r: &mut Recent| {
            for _ in 0..RECENT {
                r.put(a, crate::detect::testing::event("http_request"));
            }
        };
        fill(&mut r);
        assert_eq!(r.get(a, &first.id), Some(&first));
        fill(&mut r);
        assert_eq!(r.get(a, &first.id), None);
        assert!(r.new.len() + r.old.len() <= 2 * RECENT);
    }
}
