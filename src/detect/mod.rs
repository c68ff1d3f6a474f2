//! Detection: Sigma rules (evaluated with `rsigma-eval`) and behavioural
//! detectors over the event stream, per tenant, in event time.
//!
//! - [`rules`]: parsing and validating Sigma text into a [`RuleSet`], the
//!   embedded default pack, and [`load_dir`] (the only IO in this module).
//! - [`taxonomy`]: how an event looks to rules (logsource and field names).
//! - [`evaluator`]: per-tenant correlation state and the [`Evaluator`].
//! - [`behavior`]: detectors Sigma cannot express (new VPN network, data
//!   exfiltration volume, unusual hour).
//!
//! **Architecture invariant:** nothing here but [`load_dir`] does IO; the
//! evaluator's memory is bounded by [`EvaluatorConfig`], and its state can be
//! rebuilt by replaying the last [`Evaluator::max_lookback`] of events.

pub mod behavior;
pub mod evaluator;
pub mod features;
pub mod rules;
pub mod taxonomy;

#[cfg(test)]
mod pack_tests;
#[cfg(test)]
pub(crate) mod testing;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::Severity;

pub use evaluator::{Evaluator, EvaluatorConfig, EvaluatorStats, TenantRules};
pub use rules::{
    RuleError, RuleInfo, RuleKind, RuleLoadError, RuleOrigin, RuleSet, RuleSource, builtin_sources,
    load_dir, validate,
};

/// Most evidence event ids one detection carries.
pub const MAX_EVIDENCE: usize = 100;

/// Errors at the detection module's boundary.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// A rules directory could not be read.
    #[error("failed to read rules from {path}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for [`DetectError`].
pub type DetectResult<T> = Result<T, DetectError>;

pub use crate::domain::alert::{Entity, EntityKind};

/// The server's current built-in + directory rules, shared between the
/// pipeline (which reloads the directory) and the API (which lists them).
#[derive(Debug, Clone)]
pub struct SharedRules(std::sync::Arc<std::sync::RwLock<std::sync::Arc<RuleSet>>>);

impl SharedRules {
    /// Starts with `set`.
    pub fn new(set: RuleSet) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(set),
        )))
    }

    /// The current set.
    pub fn current(&self) -> std::sync::Arc<RuleSet> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the set.
    pub fn replace(&self, set: RuleSet) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(set);
    }
}

/// A cheap fingerprint of a rules directory: name, size and modification time
/// of each `.yml`/`.yaml` file.
pub type DirStamp = Vec<(String, u64, Option<std::time::SystemTime>)>;

/// The [`DirStamp`] of `dir`, to notice changes by polling.
pub fn dir_stamp(dir: &std::path::Path) -> DirStamp {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "yml" || x == "yaml")
        })
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.modified().ok(),
            ))
        })
        .collect();
    out.sort();
    out
}

/// What produced a detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetectionKind {
    /// A single-event Sigma detection rule.
    Rule,
    /// A Sigma correlation rule (event_count, value_count, temporal, …).
    Correlation,
    /// A behavioural detector in [`behavior`].
    Behavior,
}

/// Something a rule or detector found: what the server turns into an alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Rule id (the Sigma `id`, or a behavioural detector's fixed id).
    pub rule_id: String,
    /// Rule title.
    pub rule_title: String,
    /// What produced it.
    pub kind: DetectionKind,
    /// From the Sigma `level` (informational → Info; missing → Medium).
    pub severity: Severity,
    /// Threat category: the first ATT&CK tactic tag (`attack.credential-access`
    /// → `credential_access`), else the rule's logsource category.
    pub category: String,
    /// ATT&CK technique ids from `attack.tNNNN[.NNN]` tags, e.g. `T1110.003`.
    pub attack_techniques: Vec<String>,
    /// Affected actors, IPs, services, resources; sorted, no duplicates.
    pub entities: Vec<Entity>,
    /// Ids of evidence events, oldest first, at most [`MAX_EVIDENCE`].
    pub evidence: Vec<Uuid>,
    /// Occurred-at of the earliest evidence (second resolution for
    /// correlation evidence other than the triggering event).
    pub first_seen: DateTime<Utc>,
    /// Occurred-at of the latest evidence (the triggering event).
    pub last_seen: DateTime<Utc>,
    /// Stable hex hash of the rule id and the group-by values (or entities),
    /// for suppression and de-duplication.
    pub fingerprint: String,
    /// One paragraph saying what was seen, at most 4,096 bytes.
    pub summary: String,
}

/// ATT&CK technique ids from Sigma tags (`attack.t1110.003` → `T1110.003`).
pub fn attack_techniques(tags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = tags
        .iter()
        .filter_map(|t| {
            let rest = t.strip_prefix("attack.")?;
            let id = rest.strip_prefix('t').or_else(|| rest.strip_prefix('T'))?;
            let (main, sub) = match id.split_once('.') {
                Some((m, s)) => (m, Some(s)),
                None => (id, None),
            };
            let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
            if !digits(main, 4) || sub.is_some_and(|s| !digits(s, 3)) {
                return None;
            }
            Some(match sub {
                Some(s) => format!("T{main}.{s}"),
                None => format!("T{main}"),
            })
        })
        .collect();
    out.dedup();
    out
}

/// The first ATT&CK tactic among Sigma tags, in snake case
/// (`attack.privilege-escalation` → `privilege_escalation`).
pub fn attack_tactic(tags: &[String]) -> Option<String> {
    tags.iter().find_map(|t| {
        let rest = t.strip_prefix("attack.")?;
        let is_tactic = rest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-' || b == b'_')
            && !rest.is_empty();
        is_tactic.then(|| rest.replace('-', "_"))
    })
}

/// A stable fingerprint: hex SHA-256 (first 16 bytes) of the rule id and the
/// sorted `(name, value)` pairs.
pub fn fingerprint(rule_id: &str, parts: &[(String, String)]) -> String {
    use sha2::{Digest, Sha256};
    let mut parts: Vec<&(String, String)> = parts.iter().collect();
    parts.sort();
    let mut h = Sha256::new();
    h.update(rule_id.as_bytes());
    for (k, v) in parts {
        h.update([0u8]);
        h.update(k.as_bytes());
        h.update([1u8]);
        h.update(v.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn techniques_and_tactics_come_from_tags() {
        let tags: Vec<String> = [
            "attack.credential-access",
            "attack.t1110.003",
            "attack.T1078",
            "attack.t11",
            "cve.2021-1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(attack_techniques(&tags), vec!["T1110.003", "T1078"]);
        assert_eq!(attack_tactic(&tags).as_deref(), Some("credential_access"));
    }

    #[test]
    fn fingerprints_ignore_part_order() {
        let a = ("Actor".to_string(), "alice".to_string());
        let b = ("SourceIp".to_string(), "1.2.3.4".to_string());
        assert_eq!(
            fingerprint("r", &[a.clone(), b.clone()]),
            fingerprint("r", &[b.clone(), a.clone()])
        );
        assert_ne!(
            fingerprint("r", std::slice::from_ref(&a)),
            fingerprint("s", &[a])
        );
    }
}
