//! The detection pipeline: follows each tenant's committed events in the
//! store (woken by the ingest hand-off), evaluates them with the rule engine in
//! event time, and raises alerts (folding repeats by fingerprint).
//!
//! The store is the source of truth: the hand-off only says which tenant has
//! new events, and the pipeline reads them from its per-tenant feed position.
//! If it lags behind the hand-off it misses nothing; the lag is counted in
//! `picket_ingest_handoff_lagged_total` and it catches up from the store.
//!
//! Restart: window state is **rebuilt**, not persisted. At start the pipeline
//! records each tenant's feed head, replays the tenant's events of the last
//! `replay` (at most `replay_max_events`, oldest first) up to that head (later
//! ones are evaluated live from the feed, exactly once) through the engine, and
//! raises only detections that no stored alert already covers (same
//! fingerprint with last_seen at or after the detection's first_seen: a
//! replay that reaches less history can fire later within the same burst, e.g.
//! the exfiltration detector on its cold-start threshold, and that is still
//! the burst alerted before). Correlation windows (minutes) are thereby
//! restored exactly; behavioural baselines (30 days) are restored as far as
//! the replay reaches. Anomaly windows rebuilt from replayed events train the
//! baseline but never raise, also when the wall clock closes them after the
//! replay: they were scored before the restart. Only a window that live events
//! join can raise. So a restart with no new events changes no alert.

pub mod lag;
mod raiser;
pub mod scoring;
pub mod shards;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::detect::features::ClosedWindow;
use crate::detect::{Detection, Evaluator, RuleOrigin, RuleSource, TenantRules};
use crate::domain::TenantId;
use crate::domain::alert::AlertQuery;
use crate::domain::event::FeedPosition;
use crate::ingest::CommittedEvents;
use crate::pipeline::scoring::{AnomalyScorer, ScoringConfig};
use crate::storage::{Store, StoreResult};

/// Events read from a tenant's feed per round trip.
const READ: u32 = 1000;

/// Pipeline tuning.
#[derive(Debug, Clone, Copy)]
pub struct PipelineConfig {
    /// How far back state is rebuilt at start.
    pub replay: chrono::Duration,
    /// Most events replayed per tenant at start.
    pub replay_max_events: usize,
    /// Repeats of a fingerprint within this long fold into one alert.
    pub suppression: chrono::Duration,
    /// Fallback re-read of every tenant's feed and window expiry.
    pub poll: Duration,
    /// How alerts are grouped into incidents.
    pub correlation: crate::incidents::CorrelationConfig,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            replay: chrono::Duration::hours(24),
            replay_max_events: 200_000,
            suppression: chrono::Duration::hours(1),
            poll: Duration::from_secs(2),
            correlation: crate::incidents::CorrelationConfig::default(),
        }
    }
}

/// The pipeline's wall clock, which closes quiet tenants' windows: the system
/// clock, or for a simulation one it can move forward
/// ([`Clock::adjustable`], [`Clock::advance`]) to close and score the windows
/// it opened without waiting for them in real time. Each pass reports the
/// time it swept up to, so the driver knows when a move took effect
/// ([`Clock::swept_past`]).
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None`: the system clock.
    adjustable: Option<Arc<AdjustableClock>>,
}

#[derive(Debug)]
struct AdjustableClock {
    /// Added to the system clock, in milliseconds.
    offset_ms: std::sync::atomic::AtomicI64,
    /// The clock time of the last completed pass.
    swept: tokio::sync::watch::Sender<Option<DateTime<Utc>>>,
}

impl Clock {
    /// A clock that [`Clock::advance`] moves forward.
    pub fn adjustable() -> Self {
        Self {
            adjustable: Some(Arc::new(AdjustableClock {
                offset_ms: std::sync::atomic::AtomicI64::new(0),
                swept: tokio::sync::watch::Sender::new(None),
            })),
        }
    }

    /// The current time on this clock.
    pub fn now(&self) -> DateTime<Utc> {
        let now = Utc::now();
        match &self.adjustable {
            Some(c) => {
                now + chrono::Duration::milliseconds(
                    c.offset_ms.load(std::sync::atomic::Ordering::SeqCst),
                )
            }
            None => now,
        }
    }

    /// Moves an adjustable clock forward by `by` (the system clock ignores it).
    pub fn advance(&self, by: chrono::Duration) {
        if let Some(c) = &self.adjustable {
            c.offset_ms
                .fetch_add(by.num_milliseconds(), std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn swept(&self, at: DateTime<Utc>) {
        if let Some(c) = &self.adjustable {
            c.swept.send_replace(Some(at));
        }
    }

    /// Waits until a pipeline pass has closed and scored windows by this
    /// clock at `at` or later (everything it raised is then committed).
    /// Returns at once for the system clock.
    pub async fn swept_past(&self, at: DateTime<Utc>) {
        if let Some(c) = &self.adjustable {
            let mut rx = c.swept.subscribe();
            let _ = rx.wait_for(|s| s.is_some_and(|s| s >= at)).await;
        }
    }
}

/// Tenants whose rules changed (through this replica's API or a peer's),
/// shared by the pipelines of successive leadership terms.
pub type RuleUpdates = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<TenantId>>>;

/// The detection pipeline's state.
pub struct DetectionPipeline {
    /// Where events are read and alerts written.
    store: Arc<dyn Store>,
    /// Rule and behaviour evaluation, per tenant.
    evaluator: Evaluator,
    /// Next feed position per known tenant.
    positions: HashMap<TenantId, FeedPosition>,
    /// Tuning.
    config: PipelineConfig,
    /// Cancelled at shutdown; long passes stop between batches.
    shutdown: CancellationToken,
    /// Tenants whose rules changed through the API.
    rule_updates: Option<RuleUpdates>,
    /// Per-entity windows and anomaly models.
    scorer: AnomalyScorer,
    /// The rules directory to watch, the shared rule set to update, and the
    /// directory's last seen stamp.
    rules_dir: Option<(
        std::path::PathBuf,
        crate::detect::SharedRules,
        crate::detect::DirStamp,
    )>,
    /// The wall clock that closes quiet tenants' windows.
    clock: Clock,
    /// Raises alerts off the evaluation path (see `raiser.rs`).
    raiser: raiser::Raiser,
    /// How far evaluation is behind ingest.
    progress: Arc<lag::DetectProgress>,
    /// The detection shards whose tenants this pipeline evaluates (all of
    /// them unless it runs under [`shards::lead`]).
    shards: shards::ShardSet,
    /// Cancelled when the shards are lost: the alert writer drops its queue.
    fence: CancellationToken,
    /// Announced events not yet read, per tenant (see [`Owed`]).
    owed: HashMap<TenantId, Owed>,
}

/// First delay before re-reading a feed whose announced events were not all
/// readable yet.
const REREAD_FIRST: Duration = Duration::from_millis(5);
/// Longest delay between such re-reads: how long announced events can stay
/// unread after they became readable (200 ms added up to a fifth of an
/// administrator's alert delay in an alert storm; a re-read that finds
/// nothing new is one index probe).
const REREAD_MAX: Duration = Duration::from_millis(50);

/// Events the ingest hand-off announced for a tenant that its feed did not
/// show yet. On Postgres a commit is readable on the feed only once every
/// older transaction of the cluster has ended (see `storage/postgres.rs`),
/// so the read right after the notice can come back short; instead of
/// leaving them to the next poll (seconds), the pipeline re-reads with a
/// delay that doubles from [`REREAD_FIRST`] to [`REREAD_MAX`], until they
/// are read or the poll interval has passed (the poll then catches them).
#[derive(Debug, Clone, Copy)]
struct Owed {
    /// Announced events still unread.
    events: usize,
    /// Delay before the next re-read.
    delay: Duration,
    /// When the next re-read is due.
    due: tokio::time::Instant,
    /// When re-reading gives up and leaves the rest to the poll.
    until: tokio::time::Instant,
}

impl DetectionPipeline {
    /// A pipeline with no state yet; call [`DetectionPipeline::rebuild`] first.
    pub fn new(
        store: Arc<dyn Store>,
        evaluator: Evaluator,
        changes: Arc<crate::ingest::signal::Signal>,
        config: PipelineConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let fence = CancellationToken::new();
        let raiser = raiser::Raiser::spawn(raiser::RaiserConfig {
            store: store.clone(),
            changes,
            suppression: config.suppression,
            correlation: config.correlation,
            shutdown: shutdown.clone(),
            fence: fence.clone(),
        });
        Self {
            store,
            evaluator,
            positions: HashMap::new(),
            config,
            shutdown,
            rule_updates: None,
            scorer: AnomalyScorer::new(ScoringConfig::default()),
            rules_dir: None,
            clock: Clock::default(),
            raiser,
            progress: Arc::default(),
            shards: shards::ShardSet::all(1),
            fence,
            owed: HashMap::new(),
        }
    }

    /// Reports progress (detection lag) to `progress`.
    pub fn with_progress(mut self, progress: Arc<lag::DetectProgress>) -> Self {
        self.progress = progress;
        self
    }

    /// Waits until every alert queued so far is committed.
    pub async fn flush(&self) {
        self.raiser.flush().await;
    }

    /// Uses `clock` as the wall clock (a simulation drives it).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Watches `dir` (if any) and reloads the built-in + directory rules when
    /// its files change, publishing them to `shared`.
    pub fn with_rules_dir(
        mut self,
        dir: Option<std::path::PathBuf>,
        shared: crate::detect::SharedRules,
    ) -> Self {
        self.rules_dir = dir.map(|d| {
            let stamp = crate::detect::dir_stamp(&d);
            (d, shared, stamp)
        });
        self
    }

    /// Reloads the rules directory if its files changed since the last look.
    /// A directory that fails to load keeps the rules in force.
    pub fn reload_rules_dir_if_changed(&mut self) -> bool {
        let Some((dir, shared, stamp)) = self.rules_dir.as_mut() else {
            return false;
        };
        let now = crate::detect::dir_stamp(dir);
        if now == *stamp {
            return false;
        }
        *stamp = now;
        match load_rules(Some(dir)) {
            Ok(set) => {
                shared.replace(set.clone());
                self.evaluator.set_base_rules(set);
                tracing::info!(dir = %dir.display(), "rules directory reloaded");
                metrics::counter!("picket_rules_reloads_total").increment(1);
                true
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = ?e, "rules directory reload failed; keeping the rules in force");
                false
            }
        }
    }

    /// Uses these anomaly scoring settings.
    pub fn with_scoring(mut self, config: ScoringConfig) -> Self {
        self.scorer = AnomalyScorer::new(config);
        self
    }

    /// Scores closed windows and raises alerts for anomalous ones.
    async fn score_windows(
        &mut self,
        windows: Vec<ClosedWindow>,
        raise: bool,
    ) -> StoreResult<usize> {
        let mut raised = 0;
        self.scorer.learn_first(&windows);
        for w in windows {
            if let Some(a) = self.scorer.on_closed(self.store.as_ref(), &w).await?
                && raise
                && !w.replayed
            {
                let new = crate::pipeline::scoring::anomaly_alert_unread(&a);
                tracing::info!(tenant_id = %w.tenant, score = a.score, threshold = a.threshold, "anomaly alert");
                self.raiser
                    .send(raiser::Job::Ready {
                        tenant: w.tenant,
                        alert: new,
                    })
                    .await;
                raised += 1;
            }
        }
        Ok(raised)
    }

    /// Receives "this tenant's rules changed" notices from the API.
    pub fn with_rule_updates(mut self, rx: RuleUpdates) -> Self {
        self.rule_updates = Some(rx);
        self
    }

    /// Loads a tenant's own rules and overrides into the evaluator. Bad rules
    /// are logged and skipped; they never stop the tenant's other rules.
    pub async fn reload_rules(&mut self, tenant: TenantId) -> StoreResult<()> {
        let own = self.store.list_tenant_rules(tenant).await?;
        let extra = own
            .iter()
            .filter_map(|r| {
                r.sigma_yaml.as_ref().map(|y| {
                    RuleSource::new(
                        format!("tenant:{}", r.rule_id),
                        RuleOrigin::Tenant,
                        y.clone(),
                    )
                })
            })
            .collect();
        let disabled = own
            .iter()
            .filter(|r| !r.enabled)
            .map(|r| r.rule_id.clone())
            .collect();
        for e in self
            .evaluator
            .set_tenant_rules(tenant, TenantRules { extra, disabled })
        {
            tracing::warn!(tenant_id = %tenant, source = %e.source, errors = ?e.errors, "tenant rule rejected");
        }
        Ok(())
    }

    /// Rebuilds window state from recent events (see the module docs) and
    /// positions every tenant at its current feed head. Returns alerts raised.
    pub async fn rebuild(&mut self, now: DateTime<Utc>) -> StoreResult<usize> {
        let all = self.shards.clone();
        self.rebuild_of(&all, now).await
    }

    /// [`DetectionPipeline::rebuild`] for the tenants of `shards` only.
    async fn rebuild_of(
        &mut self,
        shards: &shards::ShardSet,
        now: DateTime<Utc>,
    ) -> StoreResult<usize> {
        let since = now - self.config.replay.min(self.evaluator.max_lookback());
        let mut raised = 0;
        let mut led = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let tenants = self.store.list_tenants(after.as_deref(), 500).await?;
            for t in tenants.iter().filter(|t| shards.leads(t.id)) {
                if self.shutdown.is_cancelled() {
                    return Ok(raised);
                }
                led.push(t.id);
                let head = self.store.events_head(t.id).await?.unwrap_or_default();
                self.positions.insert(t.id, head);
                self.reload_rules(t.id).await?;
                self.scorer.load(self.store.as_ref(), t.id).await?;
                let mut events = crate::pipeline::scoring::events_in_range(
                    self.store.as_ref(),
                    t.id,
                    since,
                    None,
                    self.config.replay_max_events,
                )
                .await?;
                // Events past the head are evaluated live from the feed;
                // replaying them too would count them twice (a burst of 3
                // would look like 6). The range query sees rows the head
                // does not yet (committed after it was read, or not yet
                // readable on the feed on Postgres).
                events.retain(|e| e.position <= head);
                // Replayed detections queued but not yet written: a
                // fingerprint's latest last_seen among them covers later
                // ones as a stored alert would.
                let mut queued: HashMap<String, DateTime<Utc>> = HashMap::new();
                for e in &events {
                    // Windows that close during replay were scored before the restart.
                    let closed = self.scorer.replay(t.id, &e.event);
                    self.score_windows(closed, false).await?;
                    for d in self.evaluator.observe(t.id, &e.event) {
                        let covered = queued
                            .get(&d.fingerprint)
                            .is_some_and(|last| *last >= d.first_seen);
                        if !covered && !self.already_alerted(t.id, &d).await? {
                            let last = queued.entry(d.fingerprint.clone()).or_insert(d.last_seen);
                            *last = (*last).max(d.last_seen);
                            self.raise(t.id, d, None).await;
                            raised += 1;
                        }
                    }
                }
                if !events.is_empty() {
                    tracing::info!(tenant_id = %t.id, replayed = events.len(), "detection state rebuilt");
                }
            }
            match tenants.last() {
                Some(t) if tenants.len() == 500 => after = Some(t.name.clone()),
                _ => break,
            }
        }
        self.raiser.flush().await;
        // Alerts committed before a crash whose correlation never ran (the
        // writer correlates after the alert transaction) join their
        // incidents now.
        for tenant in led {
            let leftovers = self
                .store
                .list_alerts(
                    tenant,
                    &AlertQuery {
                        uncorrelated: true,
                        start: Some(since),
                        limit: 1000,
                        ..Default::default()
                    },
                )
                .await?;
            if leftovers.is_empty() {
                continue;
            }
            match crate::incidents::correlate_batch(
                self.store.as_ref(),
                tenant,
                &leftovers,
                self.config.correlation,
                now,
            )
            .await
            {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(tenant_id = %tenant, alerts = n, "uncorrelated alerts grouped after a restart");
                        metrics::counter!("picket_incident_recorrelated_alerts_total")
                            .increment(n as u64);
                    }
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %tenant, error = %e, "correlating alerts left from before a restart failed")
                }
            }
        }
        Ok(raised)
    }

    async fn already_alerted(&self, tenant: TenantId, d: &Detection) -> StoreResult<bool> {
        let q = AlertQuery {
            fingerprint: Some(d.fingerprint.clone()),
            limit: 1,
            ..Default::default()
        };
        Ok(self
            .store
            .list_alerts(tenant, &q)
            .await?
            .first()
            .is_some_and(|a| a.last_seen >= d.first_seen))
    }

    /// Evaluates everything new in `tenant`'s feed; returns alerts raised or
    /// updated. A tenant of a shard this pipeline does not lead is left alone.
    pub async fn process_tenant(&mut self, tenant: TenantId) -> StoreResult<usize> {
        let started = std::time::Instant::now();
        let result = self.process_tenant_feed(tenant).await;
        metrics::histogram!("picket_detect_pass_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn process_tenant_feed(&mut self, tenant: TenantId) -> StoreResult<usize> {
        let mut raised = 0;
        if !self.positions.contains_key(&tenant) {
            // Known tenants are all of led shards; another's is not ours.
            if !self.shards.leads(tenant) {
                return Ok(0);
            }
            self.reload_rules(tenant).await?;
            self.scorer.load(self.store.as_ref(), tenant).await?;
            self.positions.insert(tenant, FeedPosition::default());
        }
        // While a full batch is evaluated, the next one is read and decoded
        // on another task (another core), so a backlog is worked through
        // without waiting on the store between batches.
        let mut prefetch: Option<Prefetch> = None;
        while !self.shutdown.is_cancelled() {
            let batch = match prefetch.take() {
                Some(next) => next.batch().await?,
                None => {
                    let pos = self.positions.get(&tenant).copied().unwrap_or_default();
                    self.store.events_after(tenant, pos, READ).await?
                }
            };
            let Some(last) = batch.last().map(|e| e.position) else {
                break;
            };
            if batch.len() == READ as usize {
                prefetch = Some(Prefetch::start(self.store.clone(), tenant, last));
            }
            self.progress.reading(tenant, batch[0].event.received_at);
            if let Some(o) = self.owed.get_mut(&tenant) {
                o.events = o.events.saturating_sub(batch.len());
            }
            tracing::debug!(tenant_id = %tenant, read = batch.len(), "feed read");
            let batch = Arc::new(batch);
            raised += self.evaluate_batch(tenant, batch.clone()).await?;
            self.positions.insert(tenant, last);
            metrics::counter!("picket_detect_events_total").increment(batch.len() as u64);
            let caught_up = batch.len() < READ as usize;
            let newest = batch.last().map_or_else(Utc::now, |e| e.event.received_at);
            self.progress
                .evaluated(tenant, newest, caught_up, Utc::now());
            if caught_up {
                break;
            }
        }
        Ok(raised)
    }

    /// Evaluates one batch of a tenant's feed on two cores: the rule engine
    /// and behavioural detectors here, anomaly window aggregation and scoring
    /// on a task of its own (their state is independent). The raises are then
    /// queued in exactly the order a one-task pass would queue them: per
    /// event, its rule detections, then the anomaly alerts of the windows it
    /// closed. The caller moves the feed position only once both halves have
    /// finished the batch.
    async fn evaluate_batch(
        &mut self,
        tenant: TenantId,
        batch: Arc<Vec<crate::domain::event::StoredEvent>>,
    ) -> StoreResult<usize> {
        let config = self.scorer.config();
        let scorer = std::mem::replace(&mut self.scorer, AnomalyScorer::new(config));
        let scoring = tokio::spawn(score_batch(
            scorer,
            self.store.clone(),
            tenant,
            batch.clone(),
        ));
        let mut detections: Vec<(usize, Detection)> = Vec::new();
        for (i, stored) in batch.iter().enumerate() {
            detections.extend(
                self.evaluator
                    .observe(tenant, &stored.event)
                    .into_iter()
                    .map(|d| (i, d)),
            );
        }
        let (scorer, anomalies) = match scoring.await {
            Ok(done) => done,
            Err(e) => {
                // A panic in the scoring math loses the anomaly state (not the
                // rule state); the batch is evaluated again on the next pass.
                tracing::error!(tenant_id = %tenant, error = %e, "anomaly scoring task failed; its state is reset");
                return Err(anyhow::anyhow!("the anomaly scoring task failed: {e}").into());
            }
        };
        self.scorer = scorer;
        let anomalies = anomalies?;
        let raised = detections.len() + anomalies.len();
        let mut anomalies = anomalies.into_iter().peekable();
        for (i, d) in detections {
            while let Some((_, alert)) = anomalies.next_if(|(j, _)| *j < i) {
                self.raiser.send(raiser::Job::Ready { tenant, alert }).await;
            }
            self.raise(tenant, d, Some(batch[i].event.received_at))
                .await;
        }
        for (_, alert) in anomalies {
            self.raiser.send(raiser::Job::Ready { tenant, alert }).await;
        }
        Ok(raised)
    }

    /// One pass over every known tenant plus window expiry, and waits until
    /// its alerts are committed (tests call this).
    pub async fn run_once(&mut self) -> StoreResult<usize> {
        let raised = self.sweep().await?;
        self.raiser.flush().await;
        Ok(raised)
    }

    /// [`DetectionPipeline::run_once`] as if the wall clock read `now` (tests
    /// and the simulator drive the clock to close quiet tenants' windows).
    pub async fn run_once_at(&mut self, now: DateTime<Utc>) -> StoreResult<usize> {
        let raised = self.sweep_at(now).await?;
        // Callers (tests, the simulator's clock) rely on a pass's alerts being committed.
        self.raiser.flush().await;
        Ok(raised)
    }

    /// The live loop's periodic pass: like [`DetectionPipeline::run_once`]
    /// but it does not wait for the alert writer. Evaluation never waits on
    /// alert writes: during an alert storm the writer's backlog took a minute
    /// to drain, and a pass that waited for it held every tenant's evaluation
    /// (and the next admin's brute force) that long.
    async fn sweep(&mut self) -> StoreResult<usize> {
        let now = self.clock.now();
        let raised = self.sweep_at(now).await?;
        self.clock.swept(now);
        Ok(raised)
    }

    /// One pass at `now` over every known tenant plus window expiry.
    async fn sweep_at(&mut self, now: DateTime<Utc>) -> StoreResult<usize> {
        // Expire only state older than the replay horizon: events may arrive
        // back-dated (backfills, late senders) and their windows must still
        // work; memory stays bounded by the engine's caps.
        self.evaluator.advance(now - self.config.replay);
        let tenants: Vec<TenantId> = self.positions.keys().copied().collect();
        let mut raised = 0;
        let quiet = self.scorer.close_by_clock(now);
        raised += self.score_windows(quiet, true).await?;
        for t in tenants {
            raised += self.process_tenant(t).await?;
        }
        Ok(raised)
    }

    /// Queues a detection for the alert writer (waits while its queue is full).
    async fn raise(&self, tenant: TenantId, d: Detection, received_at: Option<DateTime<Utc>>) {
        self.raiser
            .send(raiser::Job::Rule {
                tenant,
                detection: d,
                received_at,
            })
            .await;
    }

    /// Counts `accepted` newly announced events of `tenant` as owed.
    fn announce(&mut self, tenant: TenantId, accepted: usize) {
        if accepted == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        let o = self.owed.entry(tenant).or_insert(Owed {
            events: 0,
            delay: REREAD_FIRST,
            due: now,
            until: now,
        });
        o.events += accepted;
        tracing::debug!(tenant_id = %tenant, accepted, owed = o.events, "events announced");
        o.delay = REREAD_FIRST;
        o.due = now + REREAD_FIRST;
        o.until = now + self.config.poll;
    }

    /// After a pass over `tenant`: forgets it once nothing it announced is
    /// unread (or re-reading has run its time), else schedules the next
    /// re-read with a doubled delay.
    fn settle(&mut self, tenant: TenantId) {
        let now = tokio::time::Instant::now();
        let Some(o) = self.owed.get_mut(&tenant) else {
            return;
        };
        if o.events == 0 || now >= o.until || !self.positions.contains_key(&tenant) {
            if o.events > 0 {
                tracing::debug!(tenant_id = %tenant, unread = o.events, "announced events still unreadable; left to the poll");
                metrics::counter!("picket_detect_reread_abandoned_total").increment(1);
            }
            self.owed.remove(&tenant);
            return;
        }
        o.due = now + o.delay;
        o.delay = (o.delay * 2).min(REREAD_MAX);
        metrics::counter!("picket_detect_rereads_total").increment(1);
    }

    /// When the earliest owed re-read is due.
    fn next_reread(&self) -> tokio::time::Instant {
        self.owed
            .values()
            .map(|o| o.due)
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + self.config.poll)
    }

    /// Re-reads every tenant whose re-read is due.
    async fn reread_due(&mut self) -> StoreResult<usize> {
        let now = tokio::time::Instant::now();
        let due: Vec<TenantId> = self
            .owed
            .iter()
            .filter(|(_, o)| o.due <= now)
            .map(|(t, _)| *t)
            .collect();
        let mut raised = 0;
        for t in due {
            let result = self.process_tenant(t).await;
            self.settle(t);
            raised += result?;
        }
        Ok(raised)
    }

    /// Runs until shutdown, evaluating the tenants of the detection shards
    /// (of `shards`) that `commands` hands it and takes back (none at first;
    /// see [`shards::lead`]): wakes on the ingest hand-off, or every `poll`.
    pub(crate) async fn run(
        mut self,
        mut handoff: broadcast::Receiver<Arc<CommittedEvents>>,
        shards: u32,
        mut commands: tokio::sync::mpsc::Receiver<shards::Command>,
    ) {
        let shutdown = self.shutdown.clone();
        self.shards = shards::ShardSet::none(shards);
        let _leading = Leading(self.progress.clone());
        // One pipeline at a time reads the rule updates (a later leadership
        // term takes them over).
        let mut rule_updates = match self.rule_updates.take() {
            Some(rx) => Some(rx.lock_owned().await),
            None => None,
        };
        let mut ticker = tokio::time::interval(self.config.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            let result = tokio::select! {
                msg = handoff.recv() => match msg {
                    Ok(c) => {
                        self.announce(c.tenant, c.accepted);
                        let result = self.process_tenant(c.tenant).await;
                        self.settle(c.tenant);
                        result
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics::counter!("picket_ingest_handoff_lagged_total").increment(n);
                        tracing::warn!(missed = n, "detection fell behind the ingest hand-off; catching up from the store");
                        self.sweep().await
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(command) = commands.recv() => {
                    self.command(command).await;
                    Ok(0)
                }
                Some(tenant) = async { match rule_updates.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                    // Another replica's tenant: its leader reloads it.
                    if self.shards.leads(tenant) {
                        self.reload_rules(tenant).await.map(|()| 0)
                    } else {
                        Ok(0)
                    }
                }
                _ = ticker.tick() => {
                    self.reload_rules_dir_if_changed();
                    ticks += 1;
                    if ticks.is_multiple_of(shards::DISCOVER_EVERY)
                        && let Err(e) = self.discover().await
                    {
                        tracing::warn!(error = ?anyhow::Error::from(e), "looking for new tenants failed; will retry");
                    }
                    self.sweep().await
                }
                () = tokio::time::sleep_until(self.next_reread()), if !self.owed.is_empty() => {
                    self.reread_due().await
                }
                () = shutdown.cancelled() => break,
            };
            if let Err(e) = result {
                tracing::error!(error = ?anyhow::Error::from(e), "detection pass failed; will retry");
            }
            let stats = self.evaluator.stats();
            metrics::gauge!("picket_detect_correlation_groups")
                .set(stats.correlation_groups as f64);
        }
        // A clean stop commits what evaluation has detected.
        self.raiser.flush().await;
    }
}

/// Anomaly window aggregation and scoring of one batch, on its own task:
/// returns the scorer (whatever happened) and the anomaly alerts to raise,
/// each with the index of the event that closed its window.
async fn score_batch(
    mut scorer: AnomalyScorer,
    store: Arc<dyn Store>,
    tenant: TenantId,
    batch: Arc<Vec<crate::domain::event::StoredEvent>>,
) -> (
    AnomalyScorer,
    StoreResult<Vec<(usize, crate::domain::alert::NewAlert)>>,
) {
    let mut out = Vec::new();
    for (i, stored) in batch.iter().enumerate() {
        let closed = scorer.observe(tenant, &stored.event);
        scorer.learn_first(&closed);
        for w in closed {
            let hit = match scorer.on_closed(store.as_ref(), &w).await {
                Ok(hit) => hit,
                Err(e) => return (scorer, Err(e)),
            };
            if let Some(a) = hit
                && !w.replayed
            {
                tracing::info!(tenant_id = %w.tenant, score = a.score, threshold = a.threshold, "anomaly alert");
                out.push((i, crate::pipeline::scoring::anomaly_alert_unread(&a)));
            }
        }
    }
    (scorer, Ok(out))
}

/// The read of a tenant's next batch of events, running while the current
/// one is evaluated; aborted if the pass ends first.
struct Prefetch(tokio::task::JoinHandle<StoreResult<Vec<crate::domain::event::StoredEvent>>>);

impl Prefetch {
    /// Reads `tenant`'s events after `after`.
    fn start(store: Arc<dyn Store>, tenant: TenantId, after: FeedPosition) -> Self {
        Self(tokio::spawn(async move {
            store.events_after(tenant, after, READ).await
        }))
    }

    /// The batch read.
    async fn batch(mut self) -> StoreResult<Vec<crate::domain::event::StoredEvent>> {
        match (&mut self.0).await {
            Ok(read) => read,
            Err(e) => Err(anyhow::anyhow!("the feed read task failed: {e}").into()),
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks this process as running no detection once the pipeline stops (also
/// when its future is dropped because the shards were lost).
struct Leading(Arc<lag::DetectProgress>);

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.set_shards(0);
    }
}

/// The built-in rule pack plus the rules directory, if any. Bad rules are
/// logged and skipped; they never stop the others from loading.
pub fn load_rules(dir: Option<&std::path::Path>) -> anyhow::Result<crate::detect::RuleSet> {
    let Some(dir) = dir else {
        return Ok(crate::detect::RuleSet::builtin().clone());
    };
    let sources = anyhow::Context::with_context(crate::detect::load_dir(dir), || {
        format!("failed to read rules from {}", dir.display())
    })?;
    let (set, errors) = crate::detect::RuleSet::builtin().extend(sources);
    for e in &errors {
        tracing::warn!(source = %e.source, rule = ?e.rule_id, errors = ?e.errors, "rule rejected");
    }
    tracing::info!(rules = set.len(), rejected = errors.len(), dir = %dir.display(), "rules loaded");
    Ok(set)
}
