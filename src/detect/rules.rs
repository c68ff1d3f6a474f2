//! Sigma rule text → [`RuleSet`]: parsing with `rsigma-parser`, Picket's own
//! checks (ids, logsource, field names), compile checks with `rsigma-eval`,
//! and errors that point at the offending line. One bad rule never stops the
//! others from loading.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rsigma_parser::{
    CorrelationCondition, CorrelationRule, Detection as SigmaDetection, SigmaRule, parse_sigma_yaml,
};
use uuid::Uuid;

use crate::detect::taxonomy::{CATEGORIES, PRODUCT, is_known_field};
use crate::detect::{DetectError, DetectResult, attack_tactic, attack_techniques};
use crate::domain::Severity;

/// Largest rule text accepted, in bytes (matches the API limit).
pub const MAX_RULE_BYTES: usize = 64 * 1024;

/// Custom attributes a rule may carry. Other `rsigma.*` attributes change
/// engine-wide behaviour or lift memory bounds, so they are refused.
const ALLOWED_RSIGMA_ATTRIBUTES: &[&str] = &["rsigma.suppress"];

/// Where a rule comes from (mirrors `picket.v1.RuleOrigin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleOrigin {
    /// The default pack embedded in the binary (`rules/`).
    Builtin,
    /// The server's rules directory.
    Directory,
    /// Created through the API for one tenant.
    Tenant,
}

/// Sigma text to compile: one file or one API rule, possibly with several
/// `---`-separated documents (a correlation and the rules it references).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSource {
    /// Where it comes from, for error messages: a file name or a rule id.
    pub name: String,
    /// Which kind of source.
    pub origin: RuleOrigin,
    /// The YAML text.
    pub yaml: String,
}

impl RuleSource {
    /// A source.
    pub fn new(name: impl Into<String>, origin: RuleOrigin, yaml: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            origin,
            yaml: yaml.into(),
        }
    }
}

/// A problem in rule text (mirrors `picket.v1.RuleError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// 1-based line of the YAML text; 0 if not tied to a line.
    pub line: u32,
    /// 1-based column; 0 if unknown.
    pub column: u32,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}", self.message),
            (l, 0) => write!(f, "line {l}: {}", self.message),
            (l, c) => write!(f, "line {l}, column {c}: {}", self.message),
        }
    }
}

/// A document of a source that did not load, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLoadError {
    /// The source's name.
    pub source: String,
    /// The document's `id`, if it had one.
    pub rule_id: Option<String>,
    /// The problems, each pointing into the source's text.
    pub errors: Vec<RuleError>,
}

impl std::fmt::Display for RuleLoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(id) = &self.rule_id {
            write!(f, " (rule {id})")?;
        }
        for e in &self.errors {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

/// Whether a rule matches single events or correlates matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// A detection rule (`detection:` + `condition:`).
    Detection,
    /// A correlation rule (`correlation:` over other rules).
    Correlation,
}

/// What the server needs to list a loaded rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleInfo {
    /// The Sigma `id` (a UUID).
    pub id: String,
    /// The Sigma `name`, if any (correlations may reference it).
    pub name: Option<String>,
    /// The Sigma `title`.
    pub title: String,
    /// Detection or correlation.
    pub kind: RuleKind,
    /// From `level`.
    pub severity: Severity,
    /// First ATT&CK tactic, else the logsource category, else `detection`.
    pub category: String,
    /// ATT&CK technique ids.
    pub attack_techniques: Vec<String>,
    /// For correlations: the rules referenced (ids or names).
    pub references: Vec<String>,
    /// For correlations: the window, in seconds.
    pub timespan_secs: u64,
    /// For correlations: the group-by fields.
    pub group_by: Vec<String>,
    /// For value_count correlations: the counted field(s), comma-joined.
    pub count_field: Option<String>,
    /// Where it comes from.
    pub origin: RuleOrigin,
    /// The source's name.
    pub source: String,
    /// This document's own YAML text.
    pub yaml: String,
}

/// A parsed Sigma document.
#[derive(Debug, Clone)]
pub(crate) enum Doc {
    /// A detection rule.
    Detection(Box<SigmaRule>),
    /// A correlation rule.
    Correlation(Box<CorrelationRule>),
}

/// One loaded rule: its description and its parsed form.
#[derive(Debug)]
pub(crate) struct LoadedRule {
    /// Description.
    pub(crate) info: RuleInfo,
    /// Parsed form, handed to the engine.
    pub(crate) doc: Doc,
}

/// A set of loaded rules. Cheap to clone (rules are shared).
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    /// In load order: detections before the correlations that use them is not
    /// required; the engine is built detections first.
    rules: Vec<Arc<LoadedRule>>,
}

impl RuleSet {
    /// Compiles sources. Every document that is valid loads; every other one
    /// is reported, with lines relative to its source's text.
    pub fn compile(sources: Vec<RuleSource>) -> (RuleSet, Vec<RuleLoadError>) {
        RuleSet::default().extend(sources)
    }

    /// This set plus more sources (a tenant's rules on top of the shared
    /// ones). New rules may reference rules of this set; ids must not repeat.
    pub fn extend(&self, sources: Vec<RuleSource>) -> (RuleSet, Vec<RuleLoadError>) {
        let mut set = self.clone();
        let mut errors = Vec::new();
        let mut pending = Vec::new();
        for src in &sources {
            for doc in split_documents(&src.yaml) {
                match parse_doc(src, &doc) {
                    Ok(rule) => pending.push((rule, doc)),
                    Err((rule_id, errs)) => errors.push(RuleLoadError {
                        source: src.name.clone(),
                        rule_id,
                        errors: errs,
                    }),
                }
            }
        }
        let mut ids: HashSet<String> = set.rules.iter().map(|r| r.info.id.clone()).collect();
        let mut accepted = Vec::new();
        for (rule, doc) in pending {
            if !ids.insert(rule.info.id.clone()) {
                errors.push(RuleLoadError {
                    source: rule.info.source.clone(),
                    rule_id: Some(rule.info.id.clone()),
                    errors: vec![
                        doc.error_at_key("id", format!("duplicate rule id {}", rule.info.id)),
                    ],
                });
                continue;
            }
            accepted.push((rule, doc));
        }
        // Correlations whose references do not resolve are dropped; repeat
        // until stable because a dropped correlation may be referenced.
        let mut known: HashSet<String> = set.rules.iter().flat_map(|r| r.keys()).collect();
        known.extend(accepted.iter().flat_map(|(r, _)| r.keys()));
        loop {
            let mut dropped = false;
            accepted.retain(|(rule, doc)| {
                let missing: Vec<&String> = rule
                    .info
                    .references
                    .iter()
                    .filter(|r| !known.contains(*r))
                    .collect();
                if missing.is_empty() {
                    return true;
                }
                for k in rule.keys() {
                    known.remove(&k);
                }
                dropped = true;
                errors.push(RuleLoadError {
                    source: rule.info.source.clone(),
                    rule_id: Some(rule.info.id.clone()),
                    errors: missing
                        .iter()
                        .map(|m| {
                            doc.error_at_text(
                                m,
                                format!("correlation references rule `{m}`, which is not loaded"),
                            )
                        })
                        .collect(),
                });
                false
            });
            if !dropped {
                break;
            }
        }
        set.rules
            .extend(accepted.into_iter().map(|(r, _)| Arc::new(r)));
        (set, errors)
    }

    /// The embedded default pack. Its rules are tested, so it always loads.
    pub fn builtin() -> &'static RuleSet {
        static BUILTIN: OnceLock<RuleSet> = OnceLock::new();
        BUILTIN.get_or_init(|| {
            let (set, errors) = RuleSet::compile(builtin_sources());
            debug_assert!(errors.is_empty(), "builtin rules must load: {errors:?}");
            set
        })
    }

    /// Checks Sigma text in the context of this set (so a correlation may
    /// reference its rules) without adding it.
    pub fn validate(&self, yaml: &str) -> Vec<RuleError> {
        if yaml.len() > MAX_RULE_BYTES {
            return vec![RuleError {
                line: 0,
                column: 0,
                message: format!("rule text is over {MAX_RULE_BYTES} bytes"),
            }];
        }
        let (_, errors) = self.extend(vec![RuleSource::new("rule", RuleOrigin::Tenant, yaml)]);
        let mut out: Vec<RuleError> = errors.into_iter().flat_map(|e| e.errors).collect();
        if out.is_empty() && split_documents(yaml).is_empty() {
            out.push(RuleError {
                line: 0,
                column: 0,
                message: "no Sigma document found".into(),
            });
        }
        out
    }

    /// The loaded rules, in load order.
    pub fn rules(&self) -> impl Iterator<Item = &RuleInfo> {
        self.rules.iter().map(|r| &r.info)
    }

    /// A loaded rule by id.
    pub fn get(&self, id: &str) -> Option<&RuleInfo> {
        self.rules().find(|r| r.id == id)
    }

    /// Number of loaded rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rule is loaded.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The longest correlation window, in seconds.
    pub fn max_timespan_secs(&self) -> u64 {
        self.rules
            .iter()
            .map(|r| r.info.timespan_secs)
            .max()
            .unwrap_or(0)
    }

    /// The parsed rules to load into an engine, given ids disabled for a
    /// tenant: every enabled rule plus whatever an enabled correlation
    /// references (transitively), detections first.
    pub(crate) fn for_engine(&self, disabled: &HashSet<String>) -> Vec<Arc<LoadedRule>> {
        let by_key: HashMap<String, &Arc<LoadedRule>> = self
            .rules
            .iter()
            .flat_map(|r| r.keys().into_iter().map(move |k| (k, r)))
            .collect();
        let mut wanted: HashSet<String> = HashSet::new();
        let mut stack: Vec<&Arc<LoadedRule>> = self
            .rules
            .iter()
            .filter(|r| !disabled.contains(&r.info.id))
            .collect();
        while let Some(r) = stack.pop() {
            if !wanted.insert(r.info.id.clone()) {
                continue;
            }
            for reference in &r.info.references {
                if let Some(dep) = by_key.get(reference) {
                    stack.push(dep);
                }
            }
        }
        let mut out: Vec<Arc<LoadedRule>> = self
            .rules
            .iter()
            .filter(|r| wanted.contains(&r.info.id))
            .cloned()
            .collect();
        out.sort_by_key(|r| r.info.kind == RuleKind::Correlation);
        out
    }
}

impl LoadedRule {
    /// Names a correlation may use to reference this rule: id and name.
    fn keys(&self) -> Vec<String> {
        let mut k = vec![self.info.id.clone()];
        k.extend(self.info.name.clone());
        k
    }
}

/// Checks Sigma text against the default pack (a correlation may reference
/// its rules). Empty when the text would load.
pub fn validate(yaml: &str) -> Vec<RuleError> {
    RuleSet::builtin().validate(yaml)
}

/// The default rule pack, embedded at build time.
pub fn builtin_sources() -> Vec<RuleSource> {
    BUILTIN_FILES
        .iter()
        .map(|(name, yaml)| RuleSource::new(*name, RuleOrigin::Builtin, *yaml))
        .collect()
}

/// The files of `rules/`, embedded.
const BUILTIN_FILES: &[(&str, &str)] = &[
    (
        "authentication.yml",
        include_str!("../../rules/authentication.yml"),
    ),
    (
        "privilege_escalation.yml",
        include_str!("../../rules/privilege_escalation.yml"),
    ),
    (
        "firewall_rule_change.yml",
        include_str!("../../rules/firewall_rule_change.yml"),
    ),
    (
        "tenant_deletion.yml",
        include_str!("../../rules/tenant_deletion.yml"),
    ),
    ("api_quota.yml", include_str!("../../rules/api_quota.yml")),
];

/// Reads every `*.yml` / `*.yaml` file directly in `dir` (sorted by name) as
/// [`RuleOrigin::Directory`] sources. The only IO in the detection module.
pub fn load_dir(dir: &Path) -> DetectResult<Vec<RuleSource>> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| DetectError::Io { path, source }
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let is_yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yml" || e == "yaml");
        if is_yaml && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let yaml = std::fs::read_to_string(&p).map_err(io(&p))?;
            Ok(RuleSource::new(
                p.display().to_string(),
                RuleOrigin::Directory,
                yaml,
            ))
        })
        .collect()
}

/// One `---`-separated document of a source.
#[derive(Debug, Clone)]
struct DocText {
    /// 1-based line of the source on which the document starts.
    first_line: u32,
    /// The document's text.
    text: String,
}

impl DocText {
    /// An error on the first line that holds `key:` at any indentation, else
    /// on the document's first line.
    fn error_at_key(&self, key: &str, message: String) -> RuleError {
        let needle = format!("{key}:");
        let line = self
            .text
            .lines()
            .position(|l| {
                let t = l.trim_start().trim_start_matches("- ");
                t.starts_with(&needle) || t.starts_with(&format!("'{key}':"))
            })
            .map(|i| (i, column_of(&self.text, i, key)));
        self.error_at(line, message)
    }

    /// An error on the first line that contains `text`, else on the
    /// document's first line.
    fn error_at_text(&self, text: &str, message: String) -> RuleError {
        let line = self
            .text
            .lines()
            .position(|l| l.contains(text))
            .map(|i| (i, column_of(&self.text, i, text)));
        self.error_at(line, message)
    }

    /// Whether a line holds `key:` at any indentation.
    fn has_key(&self, key: &str) -> bool {
        let needle = format!("{key}:");
        self.text
            .lines()
            .any(|l| l.trim_start().trim_start_matches("- ").starts_with(&needle))
    }

    /// The 0-based line of `condition:` and the condition's lines (its own, or
    /// the list items below it).
    fn condition_lines(&self) -> Option<(usize, Vec<usize>)> {
        let lines: Vec<&str> = self.text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("condition:"))?;
        let indent = lines[at].len() - lines[at].trim_start().len();
        let inline = !lines[at].trim_start()["condition:".len()..]
            .trim()
            .is_empty();
        let mut body = vec![at];
        if !inline {
            body.extend(
                (at + 1..lines.len())
                    .take_while(|&i| {
                        let l = lines[i];
                        l.trim().is_empty() || l.len() - l.trim_start().len() > indent
                    })
                    .filter(|&i| !lines[i].trim().is_empty()),
            );
        }
        Some((at, body))
    }

    /// An error in the condition: at `(line, column)` of the condition string
    /// when the parser gave one (the column is moved to where the value starts
    /// on its line), else on the `condition:` line.
    fn error_in_condition(&self, at: Option<(usize, u32)>, message: String) -> RuleError {
        let Some((key, body)) = self.condition_lines() else {
            return self.error_at(None, message);
        };
        let lines: Vec<&str> = self.text.lines().collect();
        // A one-line condition: the value starts after `condition:`; a list:
        // the first item (the parser reports each string on its own).
        let i = if body.len() > 1 { body[1] } else { key };
        let text = lines[i];
        let value_start = match text.find("condition:") {
            Some(k) => k + "condition:".len(),
            None => text.find("- ").map_or(0, |k| k + 2),
        };
        let skipped = text[value_start..]
            .chars()
            .take_while(|c| c.is_whitespace() || *c == '\'' || *c == '"')
            .count();
        let (l, c) = at.unwrap_or((1, 1));
        let line = i + l.saturating_sub(1);
        let column = if l <= 1 {
            (value_start + skipped) as u32 + c.max(1)
        } else {
            0
        };
        self.error_at(
            Some((line.min(lines.len().saturating_sub(1)), column)),
            message,
        )
    }

    /// An error on the condition line that names `word`, else on the
    /// `condition:` line.
    fn error_at_condition_word(&self, word: &str, message: String) -> RuleError {
        let Some((key, body)) = self.condition_lines() else {
            return self.error_at_text(word, message);
        };
        let lines: Vec<&str> = self.text.lines().collect();
        let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '*';
        for i in body {
            let l = lines[i];
            let mut from = 0;
            while let Some(k) = l[from..].find(word).map(|k| k + from) {
                let before = l[..k].chars().next_back().is_none_or(|c| !is_word(c));
                let after = l[k + word.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !is_word(c));
                if before && after && (i != key || k > l.find("condition:").unwrap_or(0)) {
                    return self.error_at(Some((i, k as u32 + 1)), message);
                }
                from = k + word.len();
            }
        }
        self.error_at(
            Some((key, column_of(&self.text, key, "condition"))),
            message,
        )
    }

    fn error_at(&self, line: Option<(usize, u32)>, message: String) -> RuleError {
        match line {
            Some((i, col)) => RuleError {
                line: self.first_line + i as u32,
                column: col,
                message,
            },
            None => RuleError {
                line: self.first_line,
                column: 0,
                message,
            },
        }
    }
}

fn column_of(text: &str, line_idx: usize, needle: &str) -> u32 {
    text.lines()
        .nth(line_idx)
        .and_then(|l| l.find(needle))
        .map(|c| c as u32 + 1)
        .unwrap_or(0)
}

/// Splits on lines that are exactly `---`; drops documents with no content.
fn split_documents(yaml: &str) -> Vec<DocText> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut first = 1u32;
    let mut has_content = false;
    for (i, line) in yaml.lines().enumerate() {
        if line.trim_end() == "---" {
            if has_content {
                docs.push(DocText {
                    first_line: first,
                    text: std::mem::take(&mut cur),
                });
            }
            cur.clear();
            has_content = false;
            first = i as u32 + 2;
            continue;
        }
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') {
            has_content = true;
        }
        if !has_content && cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            // Leading blank and comment lines still count for line numbers.
            cur.push('\n');
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if has_content {
        docs.push(DocText {
            first_line: first,
            text: cur,
        });
    }
    docs
}

type DocErrors = (Option<String>, Vec<RuleError>);

/// Parses and checks one document.
fn parse_doc(src: &RuleSource, doc: &DocText) -> Result<LoadedRule, DocErrors> {
    if doc.text.contains("\naction:") || doc.text.starts_with("action:") {
        return Err((
            None,
            vec![doc.error_at_key(
                "action",
                "collection actions (global/reset/repeat) are not supported; write each rule in full".into(),
            )],
        ));
    }
    let collection = match parse_sigma_yaml(&doc.text) {
        Ok(c) => c,
        Err(e) => return Err((None, vec![locate_parser_error(doc, &e.to_string())])),
    };
    let raw_id = raw_value(&doc.text, "id");
    if !collection.errors.is_empty() {
        return Err((
            raw_id,
            collection
                .errors
                .iter()
                .map(|m| locate_parser_error(doc, m))
                .collect(),
        ));
    }
    if !collection.filters.is_empty() {
        return Err((
            raw_id,
            vec![doc.error_at_key(
                "filter",
                "Sigma filter documents are not supported; disable or edit the rule instead".into(),
            )],
        ));
    }
    let parsed = if let Some(rule) = collection.rules.into_iter().next() {
        Doc::Detection(Box::new(rule))
    } else if let Some(corr) = collection.correlations.into_iter().next() {
        Doc::Correlation(Box::new(corr))
    } else {
        return Err((
            raw_id,
            vec![RuleError {
                line: doc.first_line,
                column: 0,
                message: "not a Sigma rule or correlation".into(),
            }],
        ));
    };
    let mut errors = Vec::new();
    let (id, name, title, level, tags, custom) = match &parsed {
        Doc::Detection(r) => (
            r.id.clone(),
            r.name.clone(),
            r.title.clone(),
            r.level,
            r.tags.clone(),
            r.custom_attributes.keys().cloned().collect::<Vec<_>>(),
        ),
        Doc::Correlation(c) => (
            c.id.clone(),
            c.name.clone(),
            c.title.clone(),
            c.level,
            c.tags.clone(),
            c.custom_attributes.keys().cloned().collect::<Vec<_>>(),
        ),
    };
    let id = match id {
        None => {
            errors.push(doc.error_at(None, "missing `id`: every rule needs a UUID id".into()));
            String::new()
        }
        Some(id) if Uuid::parse_str(&id).is_err() => {
            errors.push(doc.error_at_key("id", format!("`id` must be a UUID, got `{id}`")));
            id
        }
        Some(id) => id,
    };
    for key in custom {
        if key.starts_with("rsigma.") && !ALLOWED_RSIGMA_ATTRIBUTES.contains(&key.as_str()) {
            errors.push(doc.error_at_key(
                &key,
                format!("`{key}` is not allowed (only {ALLOWED_RSIGMA_ATTRIBUTES:?})"),
            ));
        }
    }
    let mut category = None;
    let mut references = Vec::new();
    let mut timespan_secs = 0;
    let mut group_by = Vec::new();
    let mut count_field = None;
    match &parsed {
        Doc::Detection(rule) => {
            let ls = &rule.logsource;
            let ours = ls
                .product
                .as_deref()
                .is_none_or(|p| p.eq_ignore_ascii_case(PRODUCT));
            if ours {
                if let Some(cat) = &ls.category {
                    if !CATEGORIES.contains(&cat.to_ascii_lowercase().as_str()) {
                        errors.push(doc.error_at_key(
                            "category",
                            format!(
                                "unknown logsource category `{cat}`; Picket categories are {}",
                                CATEGORIES.join(", ")
                            ),
                        ));
                    }
                    category = Some(cat.to_ascii_lowercase());
                }
                let mut fields = Vec::new();
                for d in rule.detection.named.values() {
                    collect_fields(d, &mut fields);
                }
                fields.sort();
                fields.dedup();
                for f in fields {
                    if !is_known_field(&f) {
                        errors.push(doc.error_at_text(
                            &f,
                            format!(
                                "unknown field `{f}` for product picket (see rules/README.md; free-form attributes are `Attributes.<key>`)"
                            ),
                        ));
                    }
                }
            }
            if let Err(e) = rsigma_eval::compile_rule(rule) {
                errors.push(locate_parser_error(doc, &e.to_string()));
            }
        }
        Doc::Correlation(corr) => {
            references = corr.rules.clone();
            timespan_secs = corr.timespan.seconds;
            group_by = corr.group_by.clone();
            if let CorrelationCondition::Threshold {
                field: Some(fields),
                ..
            } = &corr.condition
            {
                count_field = Some(fields.join(", "));
            }
            if timespan_secs == 0 {
                errors.push(doc.error_at_key("timespan", "`timespan` must be positive".into()));
            }
            let aliases: HashSet<&str> = corr.aliases.iter().map(|a| a.alias.as_str()).collect();
            for f in &corr.group_by {
                if !aliases.contains(f.as_str()) && !is_known_field(f) {
                    errors.push(doc.error_at_text(f, format!("unknown group-by field `{f}`")));
                }
            }
            let mut engine = rsigma_eval::CorrelationEngine::new(Default::default());
            if let Err(e) = engine.add_correlation(corr) {
                errors.push(locate_parser_error(doc, &e.to_string()));
            }
        }
    }
    if !errors.is_empty() {
        return Err((Some(id).filter(|s| !s.is_empty()), errors));
    }
    let kind = match parsed {
        Doc::Detection(_) => RuleKind::Detection,
        Doc::Correlation(_) => RuleKind::Correlation,
    };
    Ok(LoadedRule {
        info: RuleInfo {
            id,
            name,
            title,
            kind,
            severity: severity_of(level),
            category: attack_tactic(&tags)
                .or(category)
                .unwrap_or_else(|| "detection".into()),
            attack_techniques: attack_techniques(&tags),
            references,
            timespan_secs,
            group_by,
            count_field,
            origin: src.origin,
            source: src.name.clone(),
            yaml: doc.text.trim_start_matches('\n').to_string(),
        },
        doc: parsed,
    })
}

/// The Sigma `level` as a Picket severity (missing → Medium).
pub fn severity_of(level: Option<rsigma_parser::Level>) -> Severity {
    use rsigma_parser::Level;
    match level {
        Some(Level::Informational) => Severity::Info,
        Some(Level::Low) => Severity::Low,
        None | Some(Level::Medium) => Severity::Medium,
        Some(Level::High) => Severity::High,
        Some(Level::Critical) => Severity::Critical,
    }
}

fn collect_fields(d: &SigmaDetection, out: &mut Vec<String>) {
    match d {
        SigmaDetection::AllOf(items) => {
            out.extend(items.iter().filter_map(|i| i.field.name.clone()));
        }
        SigmaDetection::AnyOf(subs) => {
            for s in subs {
                collect_fields(s, out);
            }
        }
        _ => {}
    }
}

/// The scalar value of a top-level `key:` line, unquoted.
fn raw_value(text: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}:");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().trim_matches(['\'', '"']).to_string())
        .filter(|v| !v.is_empty())
}

/// Points a parser or compiler message at a line of the document: an explicit
/// `line N column M` (YAML syntax), the condition (condition syntax, unknown
/// identifiers), the modifier, key or quoted text it names, and the parent
/// key of a missing nested field. Only a missing top-level field (nothing to
/// point at) falls back to the document's first line.
fn locate_parser_error(doc: &DocText, message: &str) -> RuleError {
    let message = message.trim().to_string();
    let lower = message.to_ascii_lowercase();
    // Condition syntax: "Condition parse error at L:C: …", L:C within the
    // condition string.
    if lower.contains("condition parse error") {
        let at = lower
            .split("condition parse error at ")
            .nth(1)
            .and_then(|rest| {
                let (l, rest) = rest.split_once(':')?;
                let c: String = rest.chars().take_while(char::is_ascii_digit).collect();
                Some((l.trim().parse::<usize>().ok()?, c.parse::<u32>().ok()?))
            });
        return doc.error_in_condition(at, message);
    }
    // An identifier the condition names but the detection lacks.
    if let Some(name) = lower
        .contains("unknown detection identifier")
        .then(|| message.rsplit(": ").next().unwrap_or("").trim().to_string())
        .filter(|n| !n.is_empty())
    {
        return doc.error_at_condition_word(&name, message);
    }
    if let Some((line, col)) = explicit_location(&message) {
        return RuleError {
            line: doc.first_line + line.saturating_sub(1),
            column: col,
            message,
        };
    }
    let quoted = message
        .split(['\'', '`'])
        .nth(1)
        .filter(|q| !q.is_empty())
        .map(str::to_string);
    if lower.contains("missing required field") {
        if let Some(q) = &quoted {
            // `a.b` (or `condition`, which lives under `detection`) is missing
            // from its parent: point at the parent.
            let parent = match q.rsplit_once('.') {
                Some((parent, _)) => Some(parent.rsplit('.').next().unwrap_or(parent)),
                None if q == "condition" => Some("detection"),
                None => None,
            };
            if let Some(parent) = parent {
                return doc.error_at_key(parent, message);
            }
        }
        return doc.error_at(None, message);
    }
    if lower.contains("modifier") {
        // The modifier it names, as written after a `|` in the rule.
        let named: Vec<String> = quoted
            .iter()
            .map(|q| format!("|{q}"))
            .chain(message.split('|').skip(1).map(|rest| {
                let word: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                format!("|{word}")
            }))
            .filter(|m| m.len() > 1)
            .collect();
        if let Some(m) = named.iter().find(|m| doc.text.contains(m.as_str())) {
            return doc.error_at_text(m, message);
        }
        if doc.text.contains('|') {
            return doc.error_at_text("|", message);
        }
    }
    if lower.contains("timespan") {
        return doc.error_at_key("timespan", message);
    }
    if lower.contains("regex") || lower.contains("regular expression") {
        return doc.error_at_text("|re", message);
    }
    if lower.contains("cidr") {
        return doc.error_at_text("|cidr", message);
    }
    if lower.contains("numeric") {
        for m in ["|gte", "|gt", "|lte", "|lt"] {
            if doc.text.contains(m) {
                return doc.error_at_text(m, message);
            }
        }
    }
    if let Some(q) = &quoted
        && doc.text.contains(q.as_str())
    {
        return doc.error_at_text(q, message);
    }
    if lower.contains("condition") {
        return doc.error_at_key("condition", message);
    }
    // A section it names: "logsource must be a mapping", "Invalid detection: …".
    for key in [
        "correlation",
        "detection",
        "logsource",
        "tags",
        "level",
        "status",
    ] {
        if lower.contains(key) && doc.has_key(key) {
            return doc.error_at_key(key, message);
        }
    }
    doc.error_at(None, message)
}

/// `line N column M` in a YAML error message.
fn explicit_location(message: &str) -> Option<(u32, u32)> {
    let at = message.find("line ")?;
    let rest = &message[at + 5..];
    let line: u32 = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let col = rest
        .find("column ")
        .and_then(|c| {
            rest[c + 7..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    Some((line, col))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "title: Good
id: 5a0f3b52-8f0e-4bd4-9c1a-0d8b7d3b0d01
logsource:
    product: picket
    category: authentication
detection:
    selection:
        Outcome: failure
    condition: selection
level: low
";

    #[test]
    fn the_default_pack_loads_completely() {
        let (set, errors) = RuleSet::compile(builtin_sources());
        assert!(errors.is_empty(), "{errors:#?}");
        assert!(set.len() >= 10, "{}", set.len());
        let mut ids: Vec<&str> = set.rules().map(|r| r.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), set.len(), "ids are unique");
        for r in set.rules() {
            let feeds_a_correlation = set.rules().any(|c| {
                c.references.contains(&r.id)
                    || r.name.as_ref().is_some_and(|n| c.references.contains(n))
            });
            assert!(
                feeds_a_correlation || !r.attack_techniques.is_empty(),
                "alerting rule {} has ATT&CK technique tags",
                r.title
            );
        }
    }

    #[test]
    fn a_valid_rule_validates() {
        assert_eq!(validate(GOOD), vec![]);
    }

    #[test]
    fn an_unknown_modifier_points_at_its_line() {
        let bad = GOOD.replace("Outcome: failure", "Outcome|bogus: failure");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 8);
        assert!(errors[0].message.contains("bogus"), "{}", errors[0].message);
    }

    #[test]
    fn yaml_syntax_errors_point_at_their_line() {
        let bad = GOOD.replace("        Outcome: failure", "        Outcome: [failure");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].line >= 8, "{errors:?}");
    }

    #[test]
    fn unknown_fields_categories_and_ids_are_reported() {
        let bad = GOOD
            .replace("Outcome: failure", "Outcom: failure")
            .replace("category: authentication", "category: process_creation")
            .replace("id: 5a0f3b52-8f0e-4bd4-9c1a-0d8b7d3b0d01", "id: not-a-uuid");
        let errors = validate(&bad);
        let lines: Vec<u32> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 5, 8], "{errors:#?}");
        assert!(errors[2].message.contains("unknown field `Outcom`"));
    }

    #[test]
    fn a_bad_condition_points_at_the_condition_line() {
        let bad = GOOD.replace("condition: selection", "condition: selection and and");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 9, "{errors:?}");
    }

    /// The README's example: a missing `id` (the document: line 1) and an
    /// unknown identifier in `condition:` (line 5, at the identifier).
    #[test]
    fn an_unknown_identifier_points_at_the_condition() {
        let readme = "title: x\nlogsource: {product: picket}\ndetection:\n  sel: {EventType: db.drop_table}\n  condition: nope\n";
        let errors = validate(readme);
        let at: Vec<(u32, u32)> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(at, vec![(1, 0), (5, 14)], "{errors:#?}");
        assert!(errors[0].message.contains("id"), "{}", errors[0].message);
        assert!(errors[1].message.contains("nope"), "{}", errors[1].message);

        let bad = GOOD.replace("condition: selection", "condition: selection and not other");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].column), (9, 34), "{errors:?}");
    }

    #[test]
    fn an_unknown_identifier_in_a_condition_list_points_at_its_item() {
        let bad = GOOD.replace(
            "    condition: selection\n",
            "    condition:\n        - selection\n        - missing\n",
        );
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].column), (11, 11), "{errors:?}");
    }

    #[test]
    fn a_condition_syntax_error_points_into_the_condition() {
        let bad = GOOD.replace("condition: selection", "condition: selection and and");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 9, "{errors:?}");
        assert!(errors[0].column > 15, "{errors:?}");
    }

    #[test]
    fn a_missing_field_points_at_its_parent_or_its_document() {
        // `condition` is missing from `detection` (line 6).
        let bad = GOOD.replace("    condition: selection\n", "");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 6, "{errors:?}");
        // A missing top-level field has no line of its own: its document's
        // first line (here the second document, after `---` on line 11).
        let no_title = GOOD.replace("title: Good\n", "");
        let two = format!("{GOOD}---\n{no_title}");
        let errors = RuleSet::builtin().validate(&two);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("title"), "{errors:?}");
        assert_eq!(errors[0].line, 12, "{errors:?}");
    }

    #[test]
    fn conflicting_modifiers_point_at_their_line() {
        let bad = GOOD.replace("Outcome: failure", "Actor|contains|startswith: x");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 8, "{errors:?}");
    }

    #[test]
    fn a_non_numeric_comparison_points_at_its_line() {
        let bad = GOOD.replace("Outcome: failure", "Http.StatusCode|gt: lots");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 8, "{errors:?}");
    }

    #[test]
    fn a_bad_logsource_points_at_its_line() {
        let bad = GOOD.replace(
            "logsource:\n    product: picket\n    category: authentication\n",
            "logsource: picket\n",
        );
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 3, "{errors:?}");
    }

    #[test]
    fn a_bad_regex_is_rejected_at_its_line() {
        let bad = GOOD.replace("Outcome: failure", "Actor|re: '(unclosed'");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 8, "{errors:?}");
    }

    #[test]
    fn a_bad_rule_does_not_stop_the_others() {
        let bad = GOOD
            .replace("Outcome: failure", "Outcome|bogus: failure")
            .replace(
                "5a0f3b52-8f0e-4bd4-9c1a-0d8b7d3b0d01",
                "5a0f3b52-8f0e-4bd4-9c1a-0d8b7d3b0d02",
            );
        let two_docs = format!("{GOOD}---\n{bad}");
        let (set, errors) = RuleSet::compile(vec![
            RuleSource::new("a.yml", RuleOrigin::Directory, two_docs),
            RuleSource::new("b.yml", RuleOrigin::Directory, "title: [unclosed"),
        ]);
        assert_eq!(set.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_eq!(errors[0].source, "a.yml");
        assert_eq!(
            errors[0].rule_id.as_deref(),
            Some("5a0f3b52-8f0e-4bd4-9c1a-0d8b7d3b0d02")
        );
        // GOOD is 10 lines, `---` is line 11, the bad document starts on 12.
        assert_eq!(errors[0].errors[0].line, 11 + 8, "line in the whole file");
        assert_eq!(errors[1].source, "b.yml");
    }

    #[test]
    fn duplicate_ids_and_dangling_references_are_rejected() {
        let corr = "title: Burst
id: 0b9e1f7e-1111-4c1e-9a5e-3f1d2c3b4a59
correlation:
    type: event_count
    rules:
        - no-such-rule
    group-by:
        - Actor
    timespan: 5m
    condition:
        gte: 3
";
        let (set, errors) = RuleSet::compile(vec![
            RuleSource::new("a", RuleOrigin::Tenant, GOOD),
            RuleSource::new("b", RuleOrigin::Tenant, GOOD),
            RuleSource::new("c", RuleOrigin::Tenant, corr),
        ]);
        assert_eq!(set.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].errors[0].message.contains("duplicate rule id"));
        assert_eq!(errors[0].errors[0].line, 2);
        assert!(errors[1].errors[0].message.contains("no-such-rule"));
        assert_eq!(errors[1].errors[0].line, 6);
    }

    #[test]
    fn engine_wide_attributes_are_refused() {
        let bad = format!("{GOOD}rsigma.action: reset\n");
        let errors = validate(&bad);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 11);
    }

    #[test]
    fn community_rules_for_other_products_load() {
        let win = "title: Whoami
id: e28a5a99-da44-436d-b7a0-2afc20a5f413
logsource:
    product: windows
    category: process_creation
detection:
    selection:
        Image|endswith: '\\whoami.exe'
    condition: selection
level: high
";
        assert_eq!(validate(win), vec![]);
    }

    #[test]
    fn load_dir_reads_yaml_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yml"), GOOD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let sources = load_dir(dir.path()).unwrap();
        assert_eq!(sources.len(), 1);
        assert_eq!(sources[0].origin, RuleOrigin::Directory);
        assert!(load_dir(&dir.path().join("missing")).is_err());
    }
}
