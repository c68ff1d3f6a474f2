//! Anomaly scoring of per-entity behaviour windows: a rolling baseline of
//! closed windows per tenant, a model (ECOD by default, or Isolation Forest)
//! trained on it once there are enough windows and retrained as new windows
//! accumulate, stored through the store, and every closed window scored as it
//! closes. Windows scoring above the model's contamination-based threshold
//! become alerts with the score, the feature values and the top contributors.

use std::collections::{HashMap, VecDeque};

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
    /// New windows after which the model is retrained.
    pub retrain_every: usize,
    /// Most windows kept in a tenant's baseline (oldest dropped).
    pub max_baseline: usize,
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
            retrain_every: 500,
            max_baseline: 5000,
            min_window_events: 10,
        }
    }
}

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
    let evidence = a
        .window
        .event_ids
        .iter()
        .map(|id| Evidence {
            event_id: *id,
            snapshot: by_id.remove(id),
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
    Ok(NewAlert {
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
    })
}

/// Live scoring state of the pipeline.
pub struct AnomalyScorer {
    /// Tuning.
    config: ScoringConfig,
    /// Open windows.
    windows: WindowAggregator,
    /// Recent closed windows per tenant (the training baseline).
    baseline: HashMap<TenantId, VecDeque<[f64; 10]>>,
    /// Current model per tenant.
    models: HashMap<TenantId, AnomalyModel>,
    /// Windows added since the last training, per tenant.
    since_training: HashMap<TenantId, usize>,
}

impl AnomalyScorer {
    /// Empty state.
    pub fn new(config: ScoringConfig) -> Self {
        Self {
            windows: WindowAggregator::new(config.window, chrono::Duration::minutes(1), 200_000),
            config,
            baseline: HashMap::new(),
            models: HashMap::new(),
            since_training: HashMap::new(),
        }
    }

    /// Loads a tenant's stored model, if any.
    pub async fn load(&mut self, store: &dyn Store, tenant: TenantId) -> StoreResult<()> {
        if let Some(m) = store
            .load_model(tenant, self.config.algorithm.as_str())
            .await?
        {
            match AnomalyModel::from_bytes(&m.bytes) {
                Ok(model) => {
                    self.models.insert(tenant, model);
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %tenant, error = %e, "stored anomaly model unreadable; will retrain")
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
    /// it to the baseline and retrains when due (persisting the new model).
    pub async fn on_closed(
        &mut self,
        store: &dyn Store,
        w: &ClosedWindow,
    ) -> StoreResult<Option<Anomaly>> {
        let hit = if w.events >= self.config.min_window_events {
            self.models
                .get(&w.tenant)
                .and_then(|m| score(m, self.config.algorithm, w, None))
        } else {
            None
        };
        metrics::counter!("picket_anomaly_windows_scored_total").increment(1);
        let base = self.baseline.entry(w.tenant).or_default();
        base.push_back(w.features);
        while base.len() > self.config.max_baseline {
            base.pop_front();
        }
        let n = base.len();
        let since = self.since_training.entry(w.tenant).or_default();
        *since += 1;
        let due = n >= self.config.min_windows
            && (!self.models.contains_key(&w.tenant) || *since >= self.config.retrain_every);
        if due {
            *since = 0;
            let rows: Vec<[f64; 10]> = base.iter().copied().collect();
            match fit(self.config.algorithm, &rows, self.config.contamination) {
                Ok(model) => {
                    store
                        .save_model(&StoredModel {
                            tenant_id: w.tenant,
                            algorithm: self.config.algorithm.as_str().into(),
                            trained_at: Utc::now(),
                            windows: rows.len() as u32,
                            threshold: model.threshold(),
                            bytes: model.to_bytes(),
                        })
                        .await?;
                    tracing::info!(tenant_id = %w.tenant, windows = rows.len(), threshold = model.threshold(), "anomaly model trained");
                    metrics::counter!("picket_anomaly_trainings_total").increment(1);
                    self.models.insert(w.tenant, model);
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %w.tenant, error = %e, "anomaly model training failed")
                }
            }
        }
        Ok(hit)
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
/// for `algorithm`, training one from the week before `start` if none exists.
/// `None` when there is not enough history to train.
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
    let model = match store.load_model(tenant, algorithm.as_str()).await? {
        Some(m) => AnomalyModel::from_bytes(&m.bytes).ok(),
        None => None,
    };
    let model = match model {
        Some(m) => m,
        None => {
            let history = events_in_range(
                store,
                tenant,
                start - chrono::Duration::days(7),
                Some(start),
                MAX_EVENTS,
            )
            .await?;
            let mut agg = WindowAggregator::new(config.window, chrono::Duration::zero(), 1_000_000);
            let mut rows: Vec<[f64; 10]> = Vec::new();
            for e in &history {
                rows.extend(
                    agg.observe(tenant, &e.event)
                        .into_iter()
                        .map(|w| w.features),
                );
            }
            rows.extend(agg.close_all().into_iter().map(|w| w.features));
            if rows.len() < config.min_windows {
                return Ok(None);
            }
            match fit(algorithm, &rows, config.contamination) {
                Ok(m) => {
                    store
                        .save_model(&StoredModel {
                            tenant_id: tenant,
                            algorithm: algorithm.as_str().into(),
                            trained_at: Utc::now(),
                            windows: rows.len() as u32,
                            threshold: m.threshold(),
                            bytes: m.to_bytes(),
                        })
                        .await?;
                    m
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %tenant, error = %e, "training for on-demand detection failed");
                    return Ok(None);
                }
            }
        }
    };
    let events = events_in_range(store, tenant, start, Some(end), MAX_EVENTS).await?;
    let mut agg = WindowAggregator::new(config.window, chrono::Duration::zero(), 1_000_000);
    let mut windows = Vec::new();
    for e in &events {
        windows.extend(agg.observe(tenant, &e.event));
    }
    windows.extend(agg.close_all());
    let anomalies = windows
        .iter()
        .filter_map(|w| score(&model, algorithm, w, threshold))
        .collect();
    Ok(Some(Analysis {
        windows: windows.len(),
        anomalies,
        threshold: threshold.unwrap_or_else(|| model.threshold()),
    }))
}
