//! Anomaly scoring of per-entity behaviour windows: a rolling baseline of
//! closed windows per tenant, a model (ECOD by default, or Isolation Forest)
//! trained on it once there are enough windows and retrained at most once per
//! `train_interval` (wall clock) while new windows arrive, stored through the
//! store, and every closed window scored as it closes. Windows scoring above
//! the model's contamination-based threshold become alerts with the score,
//! the feature values and the top contributors.
//!
//! Actor windows and source-IP windows are different populations (an actor
//! works all day from a few addresses; most addresses send a handful of
//! events), so each kind has its own baseline and model per tenant
//! ([`Population`]). One model over both would learn the majority: with many
//! one-event address windows every ordinary actor window looks extreme.
//!
//! Training runs on a blocking thread (`spawn_blocking`) on a copy of the
//! baseline (at most `max_baseline` most recent windows); scoring goes on with
//! the model in use, which is swapped for the new one at the first closed
//! window after the fit is done. Only a tenant's first model is waited for:
//! with no model there is nothing to score with, and it is fitted on few
//! windows.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::anomaly::{AnomalyModel, Ecod, EcodParams, IForestParams, IsolationForest, Matrix};
use crate::detect::features::{ClosedWindow, FEATURE_NAMES, WindowAggregator};
use crate::domain::alert::{Evidence, FeatureValue, NewAlert, SourceKind};
use crate::domain::event::NewEvent;
use crate::domain::rule::StoredModel;
use crate::domain::{Severity, TenantId};
use crate::storage::{Store, StoreResult};

/// Which model scores windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// ECOD (deterministic, no parameters to tune).
    Ecod,
    /// Isolation Forest (100 trees, fixed seed).
    Iforest,
}

impl Algorithm {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ecod => "ecod",
            Self::Iforest => "iforest",
        }
    }
}

/// Scoring tuning.
#[derive(Debug, Clone, Copy)]
pub struct ScoringConfig {
    /// Model used by the live pipeline.
    pub algorithm: Algorithm,
    /// Window length.
    pub window: chrono::Duration,
    /// Share of baseline windows above the threshold.
    pub contamination: f64,
    /// Windows needed before a tenant's first model is trained.
    pub min_windows: usize,
    /// Least time between two trainings of a tenant's model (a retraining
    /// starts at the first window that closes once it has passed).
    pub train_interval: chrono::Duration,
    /// Most windows kept in a tenant's baseline (oldest dropped); a training
    /// fits on all of them.
    pub max_baseline: usize,
    /// Most open behaviour windows per tenant, live and in [`analyse`];
    /// beyond it the least recently seen closes early (see [`WindowAggregator`]).
    pub max_open_windows: usize,
    /// Windows with fewer events never alert (they still train the baseline):
    /// a handful of events is not a behaviour profile, and one 404 would look extreme.
    pub min_window_events: u64,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Ecod,
            window: chrono::Duration::minutes(5),
            contamination: 0.0005,
            min_windows: 200,
            train_interval: chrono::Duration::minutes(5),
            max_baseline: 5000,
            max_open_windows: 25_000,
            min_window_events: 10,
        }
    }
}

/// Which entity windows a baseline and model are about. Stored as part of
/// the model's name (`ecod/actor`, `ecod/ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Population {
    /// Actor windows.
    Actor,
    /// Source-IP windows.
    Ip,
    /// Any other entity kind.
    Other,
}

impl Population {
    /// The population of windows about `kind`.
    pub fn of(kind: crate::domain::alert::EntityKind) -> Self {
        match kind {
            crate::domain::alert::EntityKind::Actor => Self::Actor,
            crate::domain::alert::EntityKind::Ip => Self::Ip,
            _ => Self::Other,
        }
    }

    /// Every population, in a fixed order.
    pub const ALL: [Self; 3] = [Self::Actor, Self::Ip, Self::Other];

    /// Name of `algorithm`'s model for this population in the store.
    pub fn model_name(self, algorithm: Algorithm) -> String {
        let kind = match self {
            Self::Actor => "actor",
            Self::Ip => "ip",
            Self::Other => "other",
        };
        format!("{}/{kind}", algorithm.as_str())
    }
}

/// A baseline's and model's key: the tenant and the population.
type ModelKey = (TenantId, Population);

/// A model flagging more than this many times its contamination share of the
/// windows it scored since its training (and more than [`DRIFT_MIN_EXCEEDED`])
/// no longer describes its population: see [`AnomalyScorer::score_and_learn`].
const DRIFT_FACTOR: f64 = 20.0;
/// Exceedances a model may have before its rate is judged at all.
const DRIFT_MIN_EXCEEDED: f64 = 5.0;

/// A window that scored above its threshold.
#[derive(Debug, Clone)]
pub struct Anomaly {
    /// The window.
    pub window: ClosedWindow,
    /// Its score.
    pub score: f64,
    /// The threshold it exceeded.
    pub threshold: f64,
    /// Features, highest contribution first.
    pub features: Vec<FeatureValue>,
    /// Which model.
    pub algorithm: Algorithm,
}

/// Fits a model on `rows`.
pub fn fit(
    algorithm: Algorithm,
    rows: &[[f64; 10]],
    contamination: f64,
) -> crate::anomaly::AnomalyResult<AnomalyModel> {
    let m = Matrix::from_rows(rows)?;
    Ok(match algorithm {
        Algorithm::Ecod => AnomalyModel::from(Ecod::fit(
            &m,
            &EcodParams {
                contamination,
                ..EcodParams::default()
            },
        )?),
        Algorithm::Iforest => AnomalyModel::from(IsolationForest::fit(
            &m,
            &IForestParams {
                contamination: Some(contamination),
                seed: 17,
                ..IForestParams::default()
            },
        )?),
    })
}

/// Scores one window; `Some` if it exceeds `threshold` (the model's own when `None`).
pub fn score(
    model: &AnomalyModel,
    algorithm: Algorithm,
    w: &ClosedWindow,
    threshold: Option<f64>,
) -> Option<Anomaly> {
    let s = model.score_one(&w.features).ok()?;
    let t = threshold.unwrap_or_else(|| model.threshold());
    if s <= t {
        return None;
    }
    let contributions = model.explain(&w.features).ok()?;
    let features = contributions
        .iter()
        .map(|c| FeatureValue {
            name: FEATURE_NAMES[c.feature].to_owned(),
            value: w.features[c.feature],
            contribution: c.contribution,
        })
        .collect();
    Some(Anomaly {
        window: w.clone(),
        score: s,
        threshold: t,
        features,
        algorithm,
    })
}

/// The alert an anomaly raises (evidence snapshots fetched from the store).
pub async fn anomaly_alert(store: &dyn Store, a: &Anomaly) -> StoreResult<NewAlert> {
    let events = store
        .get_events(a.window.tenant, &a.window.event_ids)
        .await?;
    let mut by_id: HashMap<uuid::Uuid, NewEvent> =
        events.into_iter().map(|e| (e.event.id, e.event)).collect();
    let mut alert = anomaly_alert_unread(a);
    for e in &mut alert.evidence {
        e.snapshot = by_id.remove(&e.event_id);
    }
    Ok(alert)
}

/// [`anomaly_alert`] without reading the evidence: every snapshot is left
/// empty for the alert writer to fill in with its batch's evidence read (so a
/// queued anomaly alert holds ids, not up to 100 events, and evaluation makes
/// no store call for it).
pub fn anomaly_alert_unread(a: &Anomaly) -> NewAlert {
    let evidence = a
        .window
        .event_ids
        .iter()
        .map(|id| Evidence {
            event_id: *id,
            snapshot: None,
        })
        .collect();
    let kind = match a.window.entity.kind {
        crate::domain::alert::EntityKind::Ip => "source IP",
        _ => "actor",
    };
    let top: Vec<String> = a
        .features
        .iter()
        .take(3)
        .map(|f| format!("{} = {:.2}", f.name, f.value))
        .collect();
    let mut h = Sha256::new();
    h.update(format!(
        "anomaly/{}/{:?}/{}",
        a.algorithm.as_str(),
        a.window.entity.kind,
        a.window.entity.value
    ));
    NewAlert {
        title: format!("Anomalous behaviour of {kind} {}", a.window.entity.value),
        summary: format!(
            "{} scored {:.3} (threshold {:.3}) for the window {}–{} ({} events); top features: {}",
            a.algorithm.as_str(),
            a.score,
            a.threshold,
            a.window.start.format("%Y-%m-%d %H:%M"),
            a.window.end.format("%H:%M"),
            a.window.events,
            top.join(", ")
        ),
        severity: if a.score >= 2.0 * a.threshold {
            Severity::High
        } else {
            Severity::Medium
        },
        category: "anomaly".into(),
        source_kind: SourceKind::Model,
        source_name: a.algorithm.as_str().into(),
        anomaly_score: a.score,
        anomaly_threshold: a.threshold,
        entities: vec![a.window.entity.clone()],
        evidence,
        features: a.features.clone(),
        attack_techniques: Vec::new(),
        first_seen: a.window.start,
        last_seen: a.window.end,
        fingerprint: hex::encode(&h.finalize()[..16]),
        raw: None,
    }
}

/// How a model is fitted (replaceable in tests, to hold a training open).
type FitFn = Arc<
    dyn Fn(Algorithm, &[[f64; 10]], f64) -> crate::anomaly::AnomalyResult<AnomalyModel>
        + Send
        + Sync,
>;

/// A training running on a blocking thread.
struct Training {
    /// Windows it fits on.
    windows: usize,
    /// The fit's outcome; closed without one if the fit panicked.
    done: tokio::sync::oneshot::Receiver<crate::anomaly::AnomalyResult<AnomalyModel>>,
}

/// Live scoring state of the pipeline.
pub struct AnomalyScorer {
    /// Tuning.
    config: ScoringConfig,
    /// Open windows.
    windows: WindowAggregator,
    /// Recent closed windows per tenant and population (the training baseline).
    baseline: HashMap<ModelKey, VecDeque<[f64; 10]>>,
    /// Current model per tenant and population.
    models: HashMap<ModelKey, AnomalyModel>,
    /// When each model's last training started (tokio's clock, so tests can
    /// pause and advance it).
    last_training: HashMap<ModelKey, tokio::time::Instant>,
    /// Trainings in flight, at most one per tenant and population.
    training: HashMap<ModelKey, Training>,
    /// Windows scored by the current model, and how many exceeded its threshold.
    since_training: HashMap<ModelKey, (u64, u64)>,
    /// Models found stale (the population moved): they raise nothing until
    /// the retraining started then is swapped in.
    stale: std::collections::HashSet<ModelKey>,
    /// Models fitted and swapped in but not yet saved to the store.
    unsaved: Vec<StoredModel>,
    /// Trainings completed (swapped in).
    trainings: u64,
    /// The fit.
    fit: FitFn,
}

impl AnomalyScorer {
    /// Empty state.
    pub fn new(config: ScoringConfig) -> Self {
        Self {
            windows: WindowAggregator::new(
                config.window,
                chrono::Duration::minutes(1),
                config.max_open_windows,
            ),
            config,
            baseline: HashMap::new(),
            models: HashMap::new(),
            last_training: HashMap::new(),
            training: HashMap::new(),
            since_training: HashMap::new(),
            stale: std::collections::HashSet::new(),
            unsaved: Vec::new(),
            trainings: 0,
            fit: Arc::new(fit),
        }
    }

    /// The settings it scores with.
    pub fn config(&self) -> ScoringConfig {
        self.config
    }

    /// Loads a tenant's stored models, if any.
    pub async fn load(&mut self, store: &dyn Store, tenant: TenantId) -> StoreResult<()> {
        for population in Population::ALL {
            let name = population.model_name(self.config.algorithm);
            if let Some(m) = store.load_model(tenant, &name).await? {
                match AnomalyModel::from_bytes(&m.bytes) {
                    Ok(model) => {
                        self.models.insert((tenant, population), model);
                    }
                    Err(e) => {
                        tracing::warn!(tenant_id = %tenant, model = %name, error = %e, "stored anomaly model unreadable; will retrain")
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts an event; returns the windows that closed.
    pub fn observe(&mut self, tenant: TenantId, e: &NewEvent) -> Vec<ClosedWindow> {
        self.windows.observe(tenant, e)
    }

    /// Counts an event replayed at a restart; its windows close `replayed`
    /// unless live events join them.
    pub fn replay(&mut self, tenant: TenantId, e: &NewEvent) -> Vec<ClosedWindow> {
        self.windows.replay(tenant, e)
    }

    /// Closes windows of quiet tenants by wall clock.
    pub fn close_by_clock(&mut self, now: DateTime<Utc>) -> Vec<ClosedWindow> {
        self.windows.close_by_clock(now)
    }

    /// Scores a closed window with the tenant's model (if trained), then adds
    /// it to the baseline and starts a training when due; persists the models
    /// trainings have produced. Waits for a fit only when the tenant has no
    /// model yet.
    pub async fn on_closed(
        &mut self,
        store: &dyn Store,
        w: &ClosedWindow,
    ) -> StoreResult<Option<Anomaly>> {
        let hit = self.score_and_learn(w);
        let key = (w.tenant, Population::of(w.entity.kind));
        if !self.models.contains_key(&key)
            && let Some(t) = self.training.remove(&key)
        {
            let done = t.done.await.ok();
            self.swap_in(key, t.windows, done);
        }
        for m in std::mem::take(&mut self.unsaved) {
            store.save_model(&m).await?;
        }
        Ok(hit)
    }

    /// Starts the first training of each population that has no model yet
    /// and reaches `min_windows` with `closed` (windows that closed together,
    /// about to go through [`AnomalyScorer::on_closed`] one by one), fitted
    /// on the baseline plus all of `closed`. Without it the first model is
    /// fitted on the first `min_windows` of them and judges the rest: when a
    /// tenant's first period closes thousands of windows at once (its actor
    /// windows at the first boundary), a model of 200 near-identical windows
    /// flags most of the others. The windows join the baseline as they are
    /// scored, as always.
    pub fn learn_first(&mut self, closed: &[ClosedWindow]) {
        let mut by_key: HashMap<ModelKey, Vec<[f64; 10]>> = HashMap::new();
        for w in closed {
            let key = (w.tenant, Population::of(w.entity.kind));
            if !self.models.contains_key(&key) && !self.training.contains_key(&key) {
                by_key.entry(key).or_default().push(w.features);
            }
        }
        for (key, batch) in by_key {
            let base = self.baseline.get(&key);
            let have = base.map_or(0, VecDeque::len);
            if have + batch.len() < self.config.min_windows || batch.len() < 2 {
                continue;
            }
            let mut rows: Vec<[f64; 10]> = base.into_iter().flatten().copied().collect();
            rows.extend(batch);
            let skip = rows.len().saturating_sub(self.config.max_baseline);
            rows.drain(..skip);
            self.start_training(key, rows);
        }
    }

    /// Fits a model of `key` on `rows` on a blocking thread.
    fn start_training(&mut self, key: ModelKey, rows: Vec<[f64; 10]>) {
        let (fit, algorithm, contamination) = (
            self.fit.clone(),
            self.config.algorithm,
            self.config.contamination,
        );
        let windows = rows.len();
        let (tx, done) = tokio::sync::oneshot::channel();
        // The handle is not kept: the outcome comes back on `done`.
        drop(tokio::task::spawn_blocking(move || {
            let _ = tx.send(fit(algorithm, &rows, contamination));
        }));
        self.training.insert(key, Training { windows, done });
        self.last_training.insert(key, tokio::time::Instant::now());
    }

    /// The synchronous part of [`AnomalyScorer::on_closed`]: swaps in the
    /// models whose fit is done, scores `w`, adds it to the baseline and
    /// starts a training when due. Never waits for a fit.
    ///
    /// Drift: a model is fitted to flag about its contamination share of a
    /// population's windows. When the whole population moves at once (every
    /// actor's volume doubles after a deployment, a load test, the first full
    /// period after a partial one), every window lies beyond the baseline and
    /// a rank-based model scores them all as extreme. A model that has flagged
    /// more than [`DRIFT_FACTOR`] × its contamination share of the windows it
    /// scored (and more than [`DRIFT_MIN_EXCEEDED`]) is stale: it raises
    /// nothing more, `picket_anomaly_drift_total` counts it, and a retraining
    /// on the baseline (which by then holds the moved windows) starts at once,
    /// outside the interval. A shift costs at most a handful of alerts instead
    /// of one per entity.
    pub fn score_and_learn(&mut self, w: &ClosedWindow) -> Option<Anomaly> {
        self.swap_finished();
        let key = (w.tenant, Population::of(w.entity.kind));
        let mut hit = None;
        if w.events >= self.config.min_window_events
            && let Some(m) = self.models.get(&key)
        {
            hit = score(m, self.config.algorithm, w, None);
            let counts = self.since_training.entry(key).or_default();
            counts.0 += 1;
            counts.1 += u64::from(hit.is_some());
            let limit = (DRIFT_FACTOR * self.config.contamination * counts.0 as f64)
                .max(DRIFT_MIN_EXCEEDED);
            if counts.1 as f64 > limit && self.stale.insert(key) {
                metrics::counter!("picket_anomaly_drift_total").increment(1);
                tracing::warn!(
                    tenant_id = %w.tenant,
                    model = %key.1.model_name(self.config.algorithm),
                    scored = counts.0,
                    exceeded = counts.1,
                    "anomaly model no longer fits its population; retraining now, raising nothing from it meanwhile"
                );
            }
            if self.stale.contains(&key) {
                hit = None;
            }
        }
        metrics::counter!("picket_anomaly_windows_scored_total").increment(1);
        let base = self.baseline.entry(key).or_default();
        base.push_back(w.features);
        while base.len() > self.config.max_baseline {
            base.pop_front();
        }
        let now = tokio::time::Instant::now();
        let interval = self.config.train_interval.to_std().unwrap_or_default();
        let due = base.len() >= self.config.min_windows
            && !self.training.contains_key(&key)
            && (!self.models.contains_key(&key)
                || self.stale.contains(&key)
                || self
                    .last_training
                    .get(&key)
                    .is_none_or(|t| now.duration_since(*t) >= interval));
        if due {
            let rows: Vec<[f64; 10]> = base.iter().copied().collect();
            self.start_training(key, rows);
        }
        hit
    }

    /// Swaps in every model whose fit has finished.
    fn swap_finished(&mut self) {
        use tokio::sync::oneshot::error::TryRecvError;
        let mut finished = Vec::new();
        for (key, t) in &mut self.training {
            match t.done.try_recv() {
                Ok(out) => finished.push((*key, t.windows, Some(out))),
                Err(TryRecvError::Closed) => finished.push((*key, t.windows, None)),
                Err(TryRecvError::Empty) => {}
            }
        }
        for (key, windows, out) in finished {
            self.training.remove(&key);
            self.swap_in(key, windows, out);
        }
    }

    fn swap_in(
        &mut self,
        key: ModelKey,
        windows: usize,
        done: Option<crate::anomaly::AnomalyResult<AnomalyModel>>,
    ) {
        let (tenant, population) = key;
        let name = population.model_name(self.config.algorithm);
        match done {
            Some(Ok(model)) => {
                tracing::info!(tenant_id = %tenant, model = %name, windows, threshold = model.threshold(), "anomaly model trained");
                metrics::counter!("picket_anomaly_trainings_total").increment(1);
                self.trainings += 1;
                self.unsaved.push(StoredModel {
                    tenant_id: tenant,
                    algorithm: name,
                    trained_at: Utc::now(),
                    windows: windows as u32,
                    threshold: model.threshold(),
                    bytes: model.to_bytes(),
                });
                self.models.insert(key, model);
                self.stale.remove(&key);
                self.since_training.remove(&key);
            }
            Some(Err(e)) => {
                tracing::warn!(tenant_id = %tenant, model = %name, error = %e, "anomaly model training failed")
            }
            None => {
                tracing::error!(tenant_id = %tenant, model = %name, "anomaly model training panicked")
            }
        }
    }

    /// Waits for every training in flight and swaps its model in (tests; a
    /// simulation that needs the retrained model before going on).
    pub async fn settle(&mut self) {
        let all: Vec<(ModelKey, Training)> = self.training.drain().collect();
        for (key, t) in all {
            let done = t.done.await.ok();
            self.swap_in(key, t.windows, done);
        }
    }

    /// Drops everything held for `tenant`: open windows (unscored),
    /// baseline, model, training in flight, unsaved model. Another replica
    /// now evaluates the tenant and loads its model from the store.
    pub fn forget(&mut self, tenant: TenantId) {
        self.windows.forget(tenant);
        self.baseline.retain(|k, _| k.0 != tenant);
        self.models.retain(|k, _| k.0 != tenant);
        self.last_training.retain(|k, _| k.0 != tenant);
        // The fit finishes on its thread; its outcome goes nowhere.
        self.training.retain(|k, _| k.0 != tenant);
        self.since_training.retain(|k, _| k.0 != tenant);
        self.stale.retain(|k| k.0 != tenant);
        self.unsaved.retain(|m| m.tenant_id != tenant);
    }

    /// Trainings completed so far.
    pub fn trainings(&self) -> u64 {
        self.trainings
    }

    /// Whether a training of one of `tenant`'s models is running.
    pub fn is_training(&self, tenant: TenantId) -> bool {
        self.training.keys().any(|k| k.0 == tenant)
    }

    /// Open windows closed early so far because a tenant reached the cap.
    pub fn windows_evicted(&self) -> u64 {
        self.windows.evicted()
    }

    /// Fits models with `fit` instead (tests hold a training open with it).
    #[cfg(test)]
    fn with_fit(mut self, fit: FitFn) -> Self {
        self.fit = fit;
        self
    }
}

/// The tenant's events with occurred_at in [start, end), oldest first, at most `max`
/// (the newest `max` if there are more).
pub async fn events_in_range(
    store: &dyn Store,
    tenant: TenantId,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    max: usize,
) -> StoreResult<Vec<crate::domain::event::StoredEvent>> {
    const PAGE: u32 = 1000;
    let mut q = crate::domain::event::EventQuery {
        start: Some(start),
        end,
        limit: PAGE,
        ..Default::default()
    };
    let mut events = Vec::new();
    loop {
        let page = store.query_events(tenant, &q).await?;
        let Some(last) = page.last() else { break };
        q.before = Some((last.event.occurred_at, last.event.id));
        let done = page.len() < PAGE as usize;
        events.extend(page);
        if done || events.len() >= max {
            break;
        }
    }
    events.truncate(max);
    events.reverse();
    Ok(events)
}

/// What an on-demand analysis found.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    /// Windows scored.
    pub windows: usize,
    /// Anomalous windows.
    pub anomalies: Vec<Anomaly>,
    /// The threshold applied.
    pub threshold: f64,
}

/// Scores every entity window of [start, end) with the tenant's stored model
/// for `algorithm` and the window's population (actor or source IP),
/// training one from the week before `start` where none exists. A population
/// with too little history to train is not scored; `None` when no
/// population can be.
pub async fn analyse(
    store: &dyn Store,
    tenant: TenantId,
    algorithm: Algorithm,
    config: ScoringConfig,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    threshold: Option<f64>,
) -> StoreResult<Option<Analysis>> {
    const MAX_EVENTS: usize = 500_000;
    let mut models: HashMap<Population, AnomalyModel> = HashMap::new();
    for population in Population::ALL {
        if let Some(m) = store
            .load_model(tenant, &population.model_name(algorithm))
            .await?
            && let Ok(model) = AnomalyModel::from_bytes(&m.bytes)
        {
            models.insert(population, model);
        }
    }
    if models.len() < Population::ALL.len() {
        let history = events_in_range(
            store,
            tenant,
            start - chrono::Duration::days(7),
            Some(start),
            MAX_EVENTS,
        )
        .await?;
        let mut agg = WindowAggregator::new(
            config.window,
            chrono::Duration::zero(),
            config.max_open_windows,
        );
        let mut rows: HashMap<Population, Vec<[f64; 10]>> = HashMap::new();
        let mut closed = Vec::new();
        for e in &history {
            closed.extend(agg.observe(tenant, &e.event));
        }
        closed.extend(agg.close_all());
        for w in closed {
            rows.entry(Population::of(w.entity.kind))
                .or_default()
                .push(w.features);
        }
        for (population, rows) in rows {
            if models.contains_key(&population) || rows.len() < config.min_windows {
                continue;
            }
            match fit(algorithm, &rows, config.contamination) {
                Ok(m) => {
                    store
                        .save_model(&StoredModel {
                            tenant_id: tenant,
                            algorithm: population.model_name(algorithm),
                            trained_at: Utc::now(),
                            windows: rows.len() as u32,
                            threshold: m.threshold(),
                            bytes: m.to_bytes(),
                        })
                        .await?;
                    models.insert(population, m);
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %tenant, model = %population.model_name(algorithm), error = %e, "training for on-demand detection failed");
                }
            }
        }
    }
    if models.is_empty() {
        return Ok(None);
    }
    let events = events_in_range(store, tenant, start, Some(end), MAX_EVENTS).await?;
    let mut agg = WindowAggregator::new(
        config.window,
        chrono::Duration::zero(),
        config.max_open_windows,
    );
    let mut windows = Vec::new();
    for e in &events {
        windows.extend(agg.observe(tenant, &e.event));
    }
    windows.extend(agg.close_all());
    // Only windows of a population with a model are analysed.
    windows.retain(|w| models.contains_key(&Population::of(w.entity.kind)));
    let anomalies = windows
        .iter()
        .filter_map(|w| {
            score(
                &models[&Population::of(w.entity.kind)],
                algorithm,
                w,
                threshold,
            )
        })
        .collect();
    // The threshold reported: the one given, else the actor model's (the
    // source-IP model's when there is no actor model).
    let reported = threshold.unwrap_or_else(|| {
        Population::ALL
            .iter()
            .find_map(|p| models.get(p))
            .map_or(0.0, |m| m.threshold())
    });
    Ok(Some(Analysis {
        windows: windows.len(),
        anomalies,
        threshold: reported,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::alert::{Entity, EntityKind};

    fn window(tenant: TenantId, i: usize, features: [f64; 10]) -> ClosedWindow {
        let start = DateTime::from_timestamp(1_800_000_000 + 300 * i as i64, 0).unwrap();
        ClosedWindow {
            tenant,
            entity: Entity::new(EntityKind::Actor, format!("u{}", i % 7)),
            start,
            end: start + chrono::Duration::minutes(5),
            features,
            events: 20,
            event_ids: Vec::new(),
            replayed: false,
        }
    }

    /// An ordinary window: small, varied values.
    fn ordinary(tenant: TenantId, i: usize) -> ClosedWindow {
        let v = (i % 13) as f64 / 13.0;
        window(
            tenant,
            i,
            [
                2.0 + v,
                v / 4.0,
                1.0 + v,
                0.7,
                v / 5.0,
                0.0,
                8.0 + v,
                0.1,
                0.0,
                0.7,
            ],
        )
    }

    /// A window far beyond every ordinary one.
    fn extreme(tenant: TenantId, i: usize) -> ClosedWindow {
        window(
            tenant,
            i,
            [9.0, 0.9, 6.0, 3.0, 0.9, 0.5, 20.0, 1.0, 4.0, 3.0],
        )
    }

    fn config() -> ScoringConfig {
        ScoringConfig {
            min_windows: 10,
            train_interval: chrono::Duration::minutes(5),
            ..ScoringConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn training_is_by_interval_not_by_window_count() {
        let t = TenantId::new();
        // The first model sees every kind of ordinary window (they repeat
        // every 13), so it has no reason to drift.
        let mut s = AnomalyScorer::new(ScoringConfig {
            min_windows: 26,
            ..config()
        });
        for i in 0..26 {
            s.score_and_learn(&ordinary(t, i));
        }
        assert!(s.is_training(t), "the first model starts at min_windows");
        s.settle().await;
        assert_eq!(s.trainings(), 1);
        // 6,000 windows within one interval (12 × the old retrain count):
        // no training.
        for i in 26..6010 {
            s.score_and_learn(&ordinary(t, i));
            assert!(!s.is_training(t), "window {i} started a training");
        }
        s.settle().await;
        assert_eq!(s.trainings(), 1);
        // The next interval trains again, once.
        tokio::time::advance(std::time::Duration::from_secs(300)).await;
        s.score_and_learn(&ordinary(t, 6010));
        assert!(s.is_training(t));
        s.settle().await;
        for i in 6011..7000 {
            s.score_and_learn(&ordinary(t, i));
        }
        s.settle().await;
        assert_eq!(s.trainings(), 2);
        // Each tenant has its own interval.
        let other = TenantId::new();
        for i in 0..26 {
            s.score_and_learn(&ordinary(other, i));
        }
        s.settle().await;
        assert_eq!(s.trainings(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn actor_and_address_windows_have_models_of_their_own() {
        // Many one-event address windows (fresh addresses) and a few hundred
        // ordinary actor windows: one model over both would learn the
        // address majority, and every actor window would look extreme.
        let t = TenantId::new();
        let mut s = AnomalyScorer::new(ScoringConfig {
            min_windows: 300,
            ..config()
        });
        for i in 0..3000 {
            let v = (i % 3) as f64;
            let mut w = window(t, i, [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0 + v, 0.0, 0.0, 1.0]);
            w.entity = Entity::new(EntityKind::Ip, format!("10.0.{}.{}", i / 250, i % 250));
            w.events = 1;
            s.score_and_learn(&w);
        }
        for i in 0..300 {
            s.score_and_learn(&ordinary(t, i));
        }
        s.settle().await;
        assert_eq!(s.trainings(), 2, "one model per population");
        for i in 300..400 {
            assert!(
                s.score_and_learn(&ordinary(t, i)).is_none(),
                "ordinary actor window {i} scored as an anomaly"
            );
        }
        assert!(s.score_and_learn(&extreme(t, 400)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_period_closing_at_once_trains_on_all_of_it() {
        // 5,000 actor windows close together, all ordinary but the values
        // spread by actor: a first model fitted on the first 200 alone
        // would judge the other 4,800 against a narrow slice.
        let t = TenantId::new();
        let mut s = AnomalyScorer::new(ScoringConfig {
            min_windows: 200,
            ..config()
        });
        let closed: Vec<ClosedWindow> = (0..5000)
            .map(|i| {
                let v = (i / 200) as f64 / 25.0;
                let mut w = ordinary(t, i);
                w.features[0] = 3.0 + v;
                w.features[2] = 1.0 + v;
                w
            })
            .collect();
        s.learn_first(&closed);
        assert!(s.is_training(t));
        // What `on_closed` does for the first window: wait for the first model.
        s.settle().await;
        let hits = closed
            .iter()
            .filter(|w| s.score_and_learn(w).is_some())
            .count();
        assert_eq!(s.trainings(), 1);
        assert!(hits <= 5, "{hits} of 5,000 ordinary windows flagged");
    }

    #[tokio::test(start_paused = true)]
    async fn a_population_that_moves_at_once_raises_a_handful_then_retrains() {
        let t = TenantId::new();
        let mut s = AnomalyScorer::new(ScoringConfig {
            min_windows: 300,
            ..config()
        });
        for i in 0..300 {
            s.score_and_learn(&ordinary(t, i));
        }
        s.settle().await;
        assert_eq!(s.trainings(), 1);
        // Every actor's volume goes up fourfold at once, within the interval.
        let moved = |i: usize| {
            let mut w = ordinary(t, i);
            w.features[0] += 4.0;
            w.features[6] += 4.0;
            w
        };
        let mut hits = 0;
        for i in 300..700 {
            hits += usize::from(s.score_and_learn(&moved(i)).is_some());
            s.settle().await;
        }
        // A handful per retraining until the baseline has caught up.
        assert!(hits <= 15, "{hits} windows of a moved population raised");
        assert!(s.trainings() >= 2, "the drift started a retraining");
        // The retrained model knows the new level: no more alerts, and a
        // window beyond it still scores.
        for i in 700..800 {
            assert!(s.score_and_learn(&moved(i)).is_none(), "window {i}");
        }
        let mut far = extreme(t, 800);
        far.features[0] += 20.0;
        far.features[6] += 20.0;
        assert!(s.score_and_learn(&far).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn scoring_goes_on_with_the_old_model_while_training_runs() {
        let t = TenantId::new();
        // Trainings after the first wait for the test's go, and fit a model
        // with another threshold (contamination 0.4).
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let wait = std::sync::Mutex::new(wait);
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let gated: FitFn = Arc::new(move |algorithm, rows, contamination| {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return fit(algorithm, rows, contamination);
            }
            // Bounded, so that a training the test does not expect fails
            // its assertions instead of hanging the suite.
            let _ = wait
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(30));
            fit(algorithm, rows, 0.4)
        });
        // The first model sees every kind of ordinary window (they repeat
        // every 13): fitted on fewer, it flags the kinds it never saw, and
        // when it is swapped in while the first windows are still being
        // scored (a slow machine) that is a drift and a retraining this
        // test does not expect.
        let first = ScoringConfig {
            min_windows: 26,
            ..config()
        };
        let mut s = AnomalyScorer::new(first).with_fit(gated);
        for i in 0..300 {
            s.score_and_learn(&ordinary(t, i));
        }
        s.settle().await;
        let old = s
            .score_and_learn(&extreme(t, 300))
            .expect("scored by the first model");
        tokio::time::advance(std::time::Duration::from_secs(300)).await;
        s.score_and_learn(&ordinary(t, 301));
        assert!(s.is_training(t));
        // The fit is held open: windows are still scored, by the old model
        // (a few: more would be a drift).
        for i in 302..305 {
            let a = s.score_and_learn(&extreme(t, i)).expect("still scored");
            assert_eq!(a.threshold, old.threshold);
            assert!(s.is_training(t));
        }
        assert_eq!(s.trainings(), 1);
        go.send(()).unwrap();
        s.settle().await;
        assert_eq!(s.trainings(), 2);
        let new = s
            .score_and_learn(&extreme(t, 305))
            .expect("scored by the new model");
        assert_ne!(new.threshold, old.threshold, "the new model is in use");
    }
}
