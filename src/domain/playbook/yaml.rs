//! Playbooks as YAML files (`picket playbook apply`, `--playbooks-dir`, the
//! built-in pack). One playbook per document; documents are separated by
//! `---` lines. Errors carry the line they are about, counted from the start
//! of the text: YAML syntax errors the parser's position, validation errors
//! the line of the key they name (a step's parameter, a step, a top-level
//! key), or the document's first line.
//!
//! ```yaml
//! name: contain-brute-force
//! description: Block the source IP for an hour, note it, notify.
//! required_approvals: 1
//! trigger:
//!   min_severity: high
//!   categories: [credential_access]
//! steps:
//!   - name: block-source-ip
//!     action: block_ip
//!     requires_approval: true
//!     params:
//!       ip: "{{entity.ip}}"
//!       duration_seconds: 3600
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::domain::playbook::{ActionKind, PlaybookDef, Step, Trigger};
use crate::domain::{FieldViolation, Severity};

/// A problem in a playbook file, at a line (1-based, of the whole text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// Line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// One document of a file: the playbook, or everything wrong with it.
pub type Parsed = Result<PlaybookDef, Vec<FileError>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    required_approvals: u32,
    #[serde(default)]
    trigger: Option<DocTrigger>,
    steps: Vec<DocStep>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocTrigger {
    #[serde(default)]
    min_severity: Option<String>,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default)]
    rules: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocStep {
    name: String,
    action: String,
    #[serde(default)]
    params: BTreeMap<String, Scalar>,
    #[serde(default)]
    requires_approval: bool,
    #[serde(default)]
    timeout_seconds: u32,
    #[serde(default)]
    max_attempts: u32,
}

/// A parameter value as YAML may write it (`duration_seconds: 3600`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Self::Text(s) => s,
            Self::Int(n) => n.to_string(),
            Self::Float(f) => f.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

/// A severity by name (`info`, `low`, `medium`, `high`, `critical`).
pub fn parse_severity(s: &str) -> Option<Severity> {
    Some(match s.to_ascii_lowercase().as_str() {
        "info" | "informational" => Severity::Info,
        "low" => Severity::Low,
        "medium" => Severity::Medium,
        "high" => Severity::High,
        "critical" => Severity::Critical,
        _ => return None,
    })
}

/// The documents of `text` with the line each starts on (1-based).
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 1;
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            if !current.trim().is_empty() {
                docs.push((start, std::mem::take(&mut current)));
            }
            current.clear();
            start = n + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    if !current.trim().is_empty() {
        docs.push((start, current));
    }
    docs
}

/// Parses every playbook in `text`. One bad document never hides the others.
pub fn parse(text: &str) -> Vec<Parsed> {
    documents(text)
        .into_iter()
        .map(|(start, doc)| parse_doc(start, &doc))
        .collect()
}

fn parse_doc(start: usize, text: &str) -> Parsed {
    let doc: Doc = yaml_serde::from_str(text).map_err(|e| {
        let line = e.location().map_or(1, |l| l.line().max(1));
        let message = e.to_string();
        // The crate appends "at line L column C" itself; drop it (the line is ours).
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        vec![FileError {
            line: start + line - 1,
            message,
        }]
    })?;
    let mut errors = Vec::new();
    let mut steps = Vec::with_capacity(doc.steps.len());
    for (i, s) in doc.steps.into_iter().enumerate() {
        let action = ActionKind::parse(&s.action).unwrap_or_else(|| {
            errors.push(FieldViolation::new(
                format!("steps[{i}].action"),
                format!(
                    "unknown action `{}` (one of {})",
                    s.action,
                    ActionKind::ALL.map(ActionKind::as_str).join(", ")
                ),
            ));
            ActionKind::NotifyWebhook
        });
        steps.push(Step {
            name: s.name,
            action,
            params: s
                .params
                .into_iter()
                .map(|(k, v)| (k, v.into_string()))
                .collect(),
            requires_approval: s.requires_approval,
            timeout_seconds: s.timeout_seconds,
            max_attempts: s.max_attempts,
        });
    }
    let mut trigger = Trigger::default();
    if let Some(t) = doc.trigger {
        trigger.categories = t.categories;
        trigger.rules = t.rules;
        if let Some(s) = t.min_severity {
            match parse_severity(&s) {
                Some(sev) => trigger.min_severity = Some(sev),
                None => errors.push(FieldViolation::new(
                    "trigger.min_severity",
                    format!("unknown severity `{s}` (info, low, medium, high, critical)"),
                )),
            }
        }
    }
    let def = PlaybookDef {
        name: doc.name,
        description: doc.description,
        steps,
        trigger,
        enabled: doc.enabled,
        required_approvals: doc.required_approvals,
    };
    errors.extend(def.validate(""));
    if errors.is_empty() {
        Ok(def)
    } else {
        Err(errors
            .into_iter()
            .map(|v| FileError {
                line: start + line_of(text, &v.field) - 1,
                message: format!("{}: {}", v.field, v.description),
            })
            .collect())
    }
}

/// The line (1-based, within `doc`) of the key a field path names, such as
/// `steps[2].params[ip]`; the closest enclosing key found, else line 1.
pub fn line_of(doc: &str, field: &str) -> usize {
    let lines: Vec<&str> = doc.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    // `key:` at the start of the line's content, a list dash allowed before it.
    let has_key = |l: &str, key: &str| {
        let t = l.trim_start();
        let t = t.strip_prefix("- ").map_or(t, str::trim_start);
        t.strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with(':'))
            || t.strip_prefix(&format!("\"{key}\""))
                .is_some_and(|r| r.trim_start().starts_with(':'))
    };
    let (head, rest) = field.split_once('.').unwrap_or((field, ""));
    let (top, index) = match head.split_once('[') {
        Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
        None => (head, None),
    };
    let Some(top_line) = lines.iter().position(|l| indent(l) == 0 && has_key(l, top)) else {
        return 1;
    };
    let Some(index) = index else {
        if !rest.is_empty() {
            let sub = rest.split(['.', '[']).next().unwrap_or(rest);
            if let Some(n) = lines[top_line + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || indent(l) > 0)
                .position(|l| has_key(l, sub))
            {
                return top_line + 1 + n + 1;
            }
        }
        return top_line + 1;
    };
    // The list items under the key: lines starting with "- " at the items' indent.
    let mut items = Vec::new();
    let mut item_indent = None;
    for (n, l) in lines.iter().enumerate().skip(top_line + 1) {
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        if indent(l) == 0 && !l.starts_with('-') {
            break;
        }
        if l.trim_start().starts_with('-') && item_indent.is_none_or(|i| i == indent(l)) {
            item_indent = Some(indent(l));
            items.push(n);
        }
    }
    let Some(&item) = items.get(index) else {
        return top_line + 1;
    };
    let end = items.get(index + 1).copied().unwrap_or_else(|| {
        lines[item + 1..]
            .iter()
            .position(|l| !l.trim().is_empty() && indent(l) == 0)
            .map_or(lines.len(), |p| item + 1 + p)
    });
    let within = |key: &str, from: usize| (from..end).find(|n| has_key(lines[*n], key));
    let (sub, param) = match rest.split_once('[') {
        Some((k, p)) => (k, Some(p.trim_end_matches(']'))),
        None => (rest, None),
    };
    if sub.is_empty() {
        return item + 1;
    }
    let Some(sub_line) = within(sub, item) else {
        return item + 1;
    };
    if let Some(param) = param
        && let Some(p) = within(param, sub_line + 1)
    {
        return p + 1;
    }
    sub_line + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
name: contain
trigger:
  min_severity: high
  categories: [authentication]
steps:
  - name: block
    action: block_ip
    requires_approval: true
    params:
      ip: \"{{entity.ip}}\"
      duration_seconds: 3600
  - name: note
    action: add_incident_note
    params:
      text: blocked
";

    #[test]
    fn parses_a_playbook() {
        let parsed = parse(GOOD);
        let def = parsed[0].as_ref().unwrap();
        assert_eq!(def.name, "contain");
        assert_eq!(def.trigger.min_severity, Some(Severity::High));
        assert_eq!(def.steps[0].params["duration_seconds"], "3600");
        assert!(def.steps[0].requires_approval);
        assert!(def.enabled);
    }

    #[test]
    fn errors_point_at_their_line_across_documents() {
        let text = format!(
            "{GOOD}---\nname: second\nsteps:\n  - name: n\n    action: add_incident_note\n    params:\n      text: \"{{{{incident.owner}}}}\"\n---\nname: third\nsteps: [\n"
        );
        let parsed = parse(&text);
        assert!(parsed[0].is_ok());
        let second = parsed[1].as_ref().unwrap_err();
        assert_eq!(second[0].line, 22, "{second:?}");
        assert!(
            second[0].message.contains("steps[0].params[text]"),
            "{second:?}"
        );
        let third = parsed[2].as_ref().unwrap_err();
        assert!(third[0].line >= 24, "{third:?}");
    }

    #[test]
    fn unknown_actions_and_keys_are_refused() {
        let parsed = parse("name: x\nsteps:\n  - name: a\n    action: explode\n");
        let e = parsed[0].as_ref().unwrap_err();
        assert_eq!(e[0].line, 4, "{e:?}");
        let parsed = parse("name: x\ncolour: red\nsteps: []\n");
        let e = parsed[0].as_ref().unwrap_err();
        assert!(e[0].message.contains("colour"), "{e:?}");
        assert_eq!(e[0].line, 2, "{e:?}");
    }
}
