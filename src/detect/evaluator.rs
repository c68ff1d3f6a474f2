//! The evaluator: per-tenant `rsigma-eval` correlation engines plus the
//! behavioural detectors, fed events in event time, returning [`Detection`]s.
//!
//! Each tenant gets its own engine (built lazily from the shared rules plus
//! the tenant's extra rules, minus its disabled ids), so correlation state,
//! caps and rule choices never cross tenants. Windows are sliding, keyed on
//! `occurred_at` in whole seconds, and inclusive: a match exactly `timespan`
//! before the current event is still in the window, one second more is out.
//!
//! State is memory only. After a restart the server rebuilds it by replaying
//! the events of the last [`Evaluator::max_lookback`] from the store, oldest
//! first, through [`Evaluator::observe`] (and discarding the detections it
//! has already raised, which the fingerprints identify).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use rsigma_eval::{
    CorrelationConfig, CorrelationEngine, CorrelationEventMode, EvaluationResult,
    LogSourceExtractor,
};
use rsigma_parser::CorrelationType;
use uuid::Uuid;

use crate::detect::behavior::{BehaviorConfig, BehaviorState};
use crate::detect::rules::{Doc, RuleInfo, RuleKind, RuleLoadError, RuleSet, RuleSource};
use crate::detect::taxonomy::{PicketEvent, canonical_field, category_of};
use crate::detect::{Detection, DetectionKind, Entity, EntityKind, MAX_EVIDENCE, fingerprint};
use crate::domain::TenantId;
use crate::domain::event::NewEvent;

/// Bounds and defaults of the evaluator.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluatorConfig {
    /// Most correlation groups (rule × group-by values) per tenant. When
    /// reached, expired windows are dropped and then the stalest (oldest
    /// last match in event time) down to 90 % of the cap; every group dropped
    /// then counts in `picket_detect_evicted_total{kind="group"}`. The check
    /// runs before each event, which may then open one group per correlation
    /// it feeds.
    pub max_groups_per_tenant: usize,
    /// Most matches kept in one group's window (oldest dropped first; this
    /// can only under-count). Must exceed every rule's count threshold.
    pub max_entries_per_group: usize,
    /// After a correlation fires for a group it stays quiet this long, unless
    /// the rule sets `rsigma.suppress`.
    pub suppress: chrono::Duration,
    /// The behavioural detectors' thresholds and bounds.
    pub behavior: BehaviorConfig,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        Self {
            max_groups_per_tenant: 25_000,
            max_entries_per_group: 1_000,
            suppress: chrono::Duration::minutes(5),
            behavior: BehaviorConfig::default(),
        }
    }
}

/// A tenant's own rule choices on top of the shared rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantRules {
    /// The tenant's own rules (`RULE_ORIGIN_TENANT`), enabled or not.
    pub extra: Vec<RuleSource>,
    /// Ids of rules (shared, extra or behavioural) not evaluated for the
    /// tenant. A disabled detection still feeds an enabled correlation that
    /// references it, but raises nothing itself.
    pub disabled: HashSet<String>,
}

/// Sizes of the evaluator's state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvaluatorStats {
    /// Tenants with state.
    pub tenants: usize,
    /// Correlation groups with an open window.
    pub correlation_groups: usize,
    /// Evidence references held for open windows.
    pub evidence_refs: usize,
    /// Actors tracked by the behavioural detectors.
    pub behavior_actors: usize,
    /// Actors evicted by the behavioural detectors because they were full.
    pub behavior_evicted: u64,
    /// Correlation groups dropped because a tenant reached its cap.
    pub groups_evicted: u64,
}

/// One tenant's engine and state.
struct TenantState {
    /// Shared plus extra rules.
    rules: RuleSet,
    /// Rule description by id.
    infos: HashMap<String, RuleInfo>,
    /// Disabled ids.
    disabled: HashSet<String>,
    /// Detection rules whose single-event matches are reported (not disabled,
    /// and not only feeding correlations).
    emit: HashSet<String>,
    /// The engine holding correlation windows.
    engine: CorrelationEngine,
    /// Behavioural state.
    behavior: BehaviorState,
    /// Correlation groups dropped because the cap was reached.
    groups_evicted: u64,
}

/// Evaluates every tenant's events against its rules and detectors.
pub struct Evaluator {
    /// Builtin and directory rules, shared by all tenants.
    base: RuleSet,
    /// Bounds.
    config: EvaluatorConfig,
    /// Choices of tenants that have made any, with the shared rules plus
    /// their extra rules compiled.
    tenant_rules: HashMap<TenantId, (TenantRules, RuleSet)>,
    /// Live state of tenants that have sent events.
    tenants: HashMap<TenantId, TenantState>,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator")
            .field("rules", &self.base.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Evaluator {
    /// An evaluator over the shared rules (builtin plus directory).
    pub fn new(base: RuleSet, config: EvaluatorConfig) -> Self {
        Self {
            base,
            config,
            tenant_rules: HashMap::new(),
            tenants: HashMap::new(),
        }
    }

    /// Replaces the shared rules (e.g. after the rules directory changed).
    /// Open windows of correlations that keep their id survive.
    pub fn set_base_rules(&mut self, base: RuleSet) {
        self.base = base;
        for (rules, set) in self.tenant_rules.values_mut() {
            *set = self.base.extend(rules.extra.clone()).0;
        }
        let ids: Vec<TenantId> = self.tenants.keys().copied().collect();
        for t in ids {
            self.rebuild(t);
        }
    }

    /// Sets a tenant's extra rules and disabled ids. Returns the extra rules
    /// that did not load (the others still do). Open windows of correlations
    /// that keep their id survive.
    pub fn set_tenant_rules(&mut self, tenant: TenantId, rules: TenantRules) -> Vec<RuleLoadError> {
        let (set, errors) = self.base.extend(rules.extra.clone());
        self.tenant_rules.insert(tenant, (rules, set));
        if self.tenants.contains_key(&tenant) {
            self.rebuild(tenant);
        }
        errors
    }

    /// Forgets a tenant's rules and state (tenant deleted).
    pub fn remove_tenant(&mut self, tenant: TenantId) {
        self.tenant_rules.remove(&tenant);
        self.tenants.remove(&tenant);
    }

    /// How far back the server must replay events after a restart to rebuild
    /// all state: the longest correlation window or behavioural history.
    pub fn max_lookback(&self) -> chrono::Duration {
        let secs = self
            .tenant_rules
            .values()
            .map(|(_, set)| set.max_timespan_secs())
            .fold(self.base.max_timespan_secs(), u64::max);
        let rules = chrono::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX / 1000));
        rules.max(self.config.behavior.lookback())
    }

    /// Evaluates one event of a tenant, in event time, and returns what it
    /// triggered. Events should arrive roughly in `occurred_at` order: a late
    /// event is counted in the windows of its own time, so it can over-count
    /// by at most its lateness.
    pub fn observe(&mut self, tenant: TenantId, event: &NewEvent) -> Vec<Detection> {
        if !self.tenants.contains_key(&tenant) {
            let state = self.build(tenant, None);
            self.tenants.insert(tenant, state);
        }
        let Some(state) = self.tenants.get_mut(&tenant) else {
            return Vec::new();
        };
        let pe = PicketEvent::new(event);
        let now = event.occurred_at.timestamp();
        // The engine enforces its cap itself before each event; doing it
        // here first lets the groups it drops be counted.
        let before = state.engine.state_count();
        if before >= self.config.max_groups_per_tenant.max(10) {
            state.engine.evict_expired(now);
            let dropped = before.saturating_sub(state.engine.state_count()) as u64;
            state.groups_evicted += dropped;
            metrics::counter!("picket_detect_evicted_total", "kind" => "group").increment(dropped);
        }
        let results = state.engine.process_event_at(&pe, now);
        let mut out: Vec<Detection> = results
            .iter()
            .filter_map(|r| state.convert(r, event))
            .collect();
        let category = category_of(event);
        out.extend(
            state
                .behavior
                .observe(&self.config.behavior, &state.disabled, event, category),
        );
        out
    }

    /// Expires windows and behavioural history older than their spans as of
    /// `now` (call periodically with the wall clock, or with the newest event
    /// time while replaying).
    pub fn advance(&mut self, now: DateTime<Utc>) {
        for state in self.tenants.values_mut() {
            state.engine.evict_expired(now.timestamp());
            state.behavior.advance(&self.config.behavior, now);
        }
    }

    /// Sizes of the state, for metrics.
    pub fn stats(&self) -> EvaluatorStats {
        let mut s = EvaluatorStats {
            tenants: self.tenants.len(),
            ..Default::default()
        };
        for t in self.tenants.values() {
            s.correlation_groups += t.engine.state_count();
            s.evidence_refs += t.engine.event_ref_buffer_count();
            let b = t.behavior.stats();
            s.behavior_actors += b.actors;
            s.behavior_evicted += b.evicted;
            s.groups_evicted += t.groups_evicted;
        }
        s
    }

    /// Rebuilds a tenant's engine after a rule change, carrying its open
    /// windows over.
    fn rebuild(&mut self, tenant: TenantId) {
        if let Some(old) = self.tenants.remove(&tenant) {
            let snapshot = old.engine.export_state();
            let mut state = self.build(tenant, Some(old.behavior));
            state.engine.import_state(snapshot);
            state.groups_evicted = old.groups_evicted;
            self.tenants.insert(tenant, state);
        }
    }

    fn build(&self, tenant: TenantId, behavior: Option<BehaviorState>) -> TenantState {
        let (rules, disabled) = match self.tenant_rules.get(&tenant) {
            Some((tr, set)) => (set.clone(), tr.disabled.clone()),
            None => (self.base.clone(), HashSet::new()),
        };
        let loaded = rules.for_engine(&disabled);
        let c = &self.config;
        let mut engine = CorrelationEngine::new(CorrelationConfig {
            max_state_entries: c.max_groups_per_tenant.max(10),
            max_group_entries: Some(c.max_entries_per_group.max(1)),
            suppress: u64::try_from(c.suppress.num_seconds())
                .ok()
                .filter(|s| *s > 0),
            emit_detections: true,
            correlation_event_mode: CorrelationEventMode::Refs,
            max_correlation_events: MAX_EVIDENCE,
            ..CorrelationConfig::default()
        });
        engine.set_logsource_extractor(Some(LogSourceExtractor::new().with_field_names(
            "product",
            "__picket_no_service",
            "category",
        )));
        let mut referenced: HashSet<String> = HashSet::new();
        for r in &loaded {
            let added = match &r.doc {
                Doc::Detection(rule) => engine.add_rule(rule),
                Doc::Correlation(corr) => {
                    if !corr.generate {
                        referenced.extend(corr.rules.iter().cloned());
                    }
                    engine.add_correlation(corr)
                }
            };
            debug_assert!(added.is_ok(), "checked at load: {added:?}");
        }
        let emit = loaded
            .iter()
            .filter(|r| r.info.kind == RuleKind::Detection)
            .filter(|r| !disabled.contains(&r.info.id))
            .filter(|r| {
                !referenced.contains(&r.info.id)
                    && r.info.name.as_ref().is_none_or(|n| !referenced.contains(n))
            })
            .map(|r| r.info.id.clone())
            .collect();
        let infos = rules.rules().map(|i| (i.id.clone(), i.clone())).collect();
        TenantState {
            rules,
            infos,
            disabled,
            emit,
            engine,
            behavior: behavior.unwrap_or_else(|| BehaviorState::new(&c.behavior)),
            groups_evicted: 0,
        }
    }
}

impl TenantState {
    fn convert(&self, r: &EvaluationResult, e: &NewEvent) -> Option<Detection> {
        let id = r.header.rule_id.as_deref()?;
        if self.disabled.contains(id) {
            return None;
        }
        let info = self.infos.get(id)?;
        if let Some(corr) = r.as_correlation() {
            let mut entities: Vec<Entity> = corr
                .group_key
                .iter()
                .filter_map(|(f, v)| entity_of(f, v))
                .collect();
            entities.sort();
            entities.dedup();
            let refs = corr.event_refs.as_deref().unwrap_or_default();
            let mut evidence: Vec<(i64, Uuid)> = refs
                .iter()
                .filter_map(|r| Some((r.timestamp, Uuid::parse_str(r.id.as_deref()?).ok()?)))
                .collect();
            if !evidence.iter().any(|(_, id)| *id == e.id) {
                evidence.push((e.occurred_at.timestamp(), e.id));
            }
            evidence.sort();
            if evidence.len() > MAX_EVIDENCE {
                evidence.drain(..evidence.len() - MAX_EVIDENCE);
            }
            let first_seen = evidence
                .first()
                .filter(|(_, id)| *id != e.id)
                .and_then(|(t, _)| Utc.timestamp_opt(*t, 0).single())
                .unwrap_or(e.occurred_at)
                .min(e.occurred_at);
            let group = corr
                .group_key
                .iter()
                .map(|(f, v)| format!("{f}={v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let window = humanize(corr.timespan_secs);
            let n = corr.aggregated_value;
            let what = match corr.correlation_type {
                CorrelationType::EventCount => format!("{n} matching events"),
                CorrelationType::ValueCount => {
                    let field = info.count_field.as_deref().unwrap_or("value");
                    format!("{n} distinct {field} values")
                }
                CorrelationType::Temporal | CorrelationType::TemporalOrdered => {
                    let order = if corr.correlation_type == CorrelationType::TemporalOrdered {
                        " in order"
                    } else {
                        ""
                    };
                    format!(
                        "{} matched{order}",
                        self.titles(&info.references).join(" → ")
                    )
                }
                other => format!("{other:?} of {n}"),
            };
            return Some(Detection {
                rule_id: id.to_string(),
                rule_title: info.title.clone(),
                kind: DetectionKind::Correlation,
                severity: info.severity,
                category: info.category.clone(),
                attack_techniques: info.attack_techniques.clone(),
                entities,
                evidence: evidence.into_iter().map(|(_, id)| id).collect(),
                first_seen,
                last_seen: e.occurred_at,
                fingerprint: fingerprint(id, &corr.group_key),
                summary: cut(format!(
                    "{}: {what} for {group} within {window}.",
                    info.title
                )),
            });
        }
        if !self.emit.contains(id) {
            return None;
        }
        let mut entities = Vec::new();
        let mut key = Vec::new();
        if !e.actor.is_empty() {
            entities.push(Entity::new(EntityKind::Actor, &e.actor));
            key.push(("Actor".to_string(), e.actor.clone()));
        }
        if let Some(ip) = e.source_ip {
            entities.push(Entity::new(EntityKind::Ip, ip.to_string()));
            key.push(("SourceIp".to_string(), ip.to_string()));
        }
        if !e.service.is_empty() {
            entities.push(Entity::new(EntityKind::Service, &e.service));
        }
        if !e.resource.is_empty() {
            entities.push(Entity::new(EntityKind::Resource, &e.resource));
            key.push(("Resource".to_string(), e.resource.clone()));
        }
        entities.sort();
        entities.dedup();
        let actor = if e.actor.is_empty() {
            "unknown actor"
        } else {
            &e.actor
        };
        let mut summary = format!("{}: {} by {actor}", info.title, e.event_type);
        if !e.action.is_empty() {
            summary.push_str(&format!(" (action {})", e.action));
        }
        if !e.resource.is_empty() {
            summary.push_str(&format!(" on {}", e.resource));
        }
        if let Some(ip) = e.source_ip {
            summary.push_str(&format!(" from {ip}"));
        }
        summary.push('.');
        Some(Detection {
            rule_id: id.to_string(),
            rule_title: info.title.clone(),
            kind: DetectionKind::Rule,
            severity: info.severity,
            category: info.category.clone(),
            attack_techniques: info.attack_techniques.clone(),
            entities,
            evidence: vec![e.id],
            first_seen: e.occurred_at,
            last_seen: e.occurred_at,
            fingerprint: fingerprint(id, &key),
            summary: cut(summary),
        })
    }

    fn titles(&self, refs: &[String]) -> Vec<String> {
        refs.iter()
            .map(|r| {
                self.rules
                    .rules()
                    .find(|i| i.id == *r || i.name.as_deref() == Some(r))
                    .map_or_else(|| r.clone(), |i| i.title.clone())
            })
            .collect()
    }
}

/// The entity a group-by field names, if it names one.
fn entity_of(field: &str, value: &str) -> Option<Entity> {
    let kind = match canonical_field(field)? {
        "Actor" | "Change.TargetActor" | "Database.User" => EntityKind::Actor,
        "SourceIp" | "DestinationIp" => EntityKind::Ip,
        "Service" => EntityKind::Service,
        "Resource" | "Http.Path" | "Http.Route" => EntityKind::Resource,
        _ => return None,
    };
    Some(Entity::new(kind, value))
}

fn humanize(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn cut(mut s: String) -> String {
    if s.len() > 4096 {
        let mut end = 4096;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
