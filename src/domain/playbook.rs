//! Response playbooks and their runs: what a valid playbook is (steps, the
//! parameters each action takes, templates, limits), how templates are filled
//! in from an incident or alert, and the run state machine
//! (PENDING_APPROVAL → APPROVED → RUNNING → SUCCEEDED | FAILED; REJECTED,
//! CANCELLED, EXPIRED). Pure: the engine that executes runs is
//! `crate::response`.

pub mod yaml;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::alert::{Alert, EntityKind};
use crate::domain::incident::{Incident, IncidentStatus};
use crate::domain::{FieldViolation, Severity, TenantId};

/// Most steps in a playbook.
pub const MAX_STEPS: usize = 32;
/// Most parameters on a step.
pub const MAX_PARAMS: usize = 16;
/// Longest parameter value, in bytes.
pub const MAX_PARAM_BYTES: usize = 4096;
/// Longest description, comment or reason, in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Most trigger categories.
pub const MAX_CATEGORIES: usize = 16;
/// Most distinct approvers a playbook may require.
pub const MAX_APPROVALS: u32 = 5;
/// Longest attempt timeout, in seconds.
pub const MAX_TIMEOUT_SECONDS: u32 = 3600;
/// Attempt timeout when a step sets none, in seconds.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 60;
/// Most attempts of a step.
pub const MAX_ATTEMPTS: u32 = 10;
/// Attempts when a step sets none.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Shortest and longest decision duration, in seconds.
pub const DURATION_RANGE: (u64, u64) = (60, 30 * 86_400);
/// Requests per minute a THROTTLE step allows when it sets none.
pub const DEFAULT_PER_MINUTE: u32 = 60;
/// Longest notification URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// Shortest and longest approval deadline, in seconds from the request.
pub const APPROVAL_TIMEOUT_RANGE: (u32, u32) = (1, 7 * 86_400);
/// Approval deadline when the request sets none, in seconds.
pub const DEFAULT_APPROVAL_TIMEOUT: u32 = 86_400;

/// The templates a parameter value may contain.
pub const TEMPLATES: [&str; 5] = [
    "incident.id",
    "incident.title",
    "entity.ip",
    "entity.actor",
    "alert.id",
];

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Ban a source IP on the enforcement list.
    BlockIp,
    /// Disable an account on the enforcement list.
    DisableActor,
    /// Revoke an actor's sessions on the enforcement list.
    RevokeSessions,
    /// Post a signed JSON notification.
    NotifyWebhook,
    /// Append a note to the incident.
    AddIncidentNote,
    /// Change the incident's status.
    SetIncidentStatus,
    /// Throttle an IP or an actor on the enforcement list.
    Throttle,
}

/// What one parameter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKind {
    /// An IP address (after templates).
    Ip,
    /// An actor (after templates), 1..256 bytes.
    Actor,
    /// Free text of at most this many bytes.
    Text(usize),
    /// Whole seconds in [`DURATION_RANGE`]; no templates.
    Duration,
    /// An http(s) URL; no templates.
    Url,
    /// An incident status name.
    Status,
    /// Requests per minute, 1..1,000,000; no templates.
    Rate,
}

/// One parameter an action takes.
struct ParamSpec {
    name: &'static str,
    required: bool,
    kind: ParamKind,
}

const fn p(name: &'static str, required: bool, kind: ParamKind) -> ParamSpec {
    ParamSpec {
        name,
        required,
        kind,
    }
}

const BLOCK_PARAMS: &[ParamSpec] = &[
    p("ip", true, ParamKind::Ip),
    p("duration_seconds", false, ParamKind::Duration),
    p("reason", false, ParamKind::Text(512)),
];
const ACTOR_PARAMS: &[ParamSpec] = &[
    p("actor", true, ParamKind::Actor),
    p("duration_seconds", false, ParamKind::Duration),
    p("reason", false, ParamKind::Text(512)),
];
const THROTTLE_PARAMS: &[ParamSpec] = &[
    p("ip", false, ParamKind::Ip),
    p("actor", false, ParamKind::Actor),
    p("per_minute", false, ParamKind::Rate),
    p("duration_seconds", false, ParamKind::Duration),
    p("reason", false, ParamKind::Text(512)),
];
const NOTIFY_PARAMS: &[ParamSpec] = &[
    p("url", false, ParamKind::Url),
    p("message", false, ParamKind::Text(4096)),
];
const NOTE_PARAMS: &[ParamSpec] = &[p("text", true, ParamKind::Text(4096))];
const STATUS_PARAMS: &[ParamSpec] = &[p("status", true, ParamKind::Status)];

impl ActionKind {
    /// Every action, for help texts.
    pub const ALL: [ActionKind; 7] = [
        ActionKind::BlockIp,
        ActionKind::DisableActor,
        ActionKind::RevokeSessions,
        ActionKind::NotifyWebhook,
        ActionKind::AddIncidentNote,
        ActionKind::SetIncidentStatus,
        ActionKind::Throttle,
    ];

    /// The name used in YAML files and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlockIp => "block_ip",
            Self::DisableActor => "disable_actor",
            Self::RevokeSessions => "revoke_sessions",
            Self::NotifyWebhook => "notify_webhook",
            Self::AddIncidentNote => "add_incident_note",
            Self::SetIncidentStatus => "set_incident_status",
            Self::Throttle => "throttle",
        }
    }

    /// Parses [`ActionKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether it writes to the enforcement list (and so records an inverse).
    pub fn is_decision(self) -> bool {
        matches!(
            self,
            Self::BlockIp | Self::DisableActor | Self::RevokeSessions | Self::Throttle
        )
    }

    /// Whether it acts on the run's incident.
    pub fn needs_incident(self) -> bool {
        matches!(self, Self::AddIncidentNote | Self::SetIncidentStatus)
    }

    /// The default duration of a decision it writes, in seconds.
    pub fn default_duration(self) -> u64 {
        match self {
            Self::DisableActor => 86_400,
            _ => 3600,
        }
    }

    fn params(self) -> &'static [ParamSpec] {
        match self {
            Self::BlockIp => BLOCK_PARAMS,
            Self::DisableActor | Self::RevokeSessions => ACTOR_PARAMS,
            Self::Throttle => THROTTLE_PARAMS,
            Self::NotifyWebhook => NOTIFY_PARAMS,
            Self::AddIncidentNote => NOTE_PARAMS,
            Self::SetIncidentStatus => STATUS_PARAMS,
        }
    }
}

/// An incident status by its parameter name (`open`, `investigating`, …).
pub fn parse_incident_status(s: &str) -> Option<IncidentStatus> {
    Some(match s {
        "open" => IncidentStatus::Open,
        "investigating" => IncidentStatus::Investigating,
        "contained" => IncidentStatus::Contained,
        "resolved" => IncidentStatus::Resolved,
        "closed" => IncidentStatus::Closed,
        _ => return None,
    })
}

/// One step of a playbook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Unique within the playbook.
    #[serde(default)]
    pub name: String,
    /// What it does.
    pub action: ActionKind,
    /// Parameters (values may hold templates).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Whether a human must approve the run first.
    #[serde(default)]
    pub requires_approval: bool,
    /// Attempt timeout in seconds (0: the default).
    #[serde(default)]
    pub timeout_seconds: u32,
    /// Attempts before failing (0: the default).
    #[serde(default)]
    pub max_attempts: u32,
}

/// When a playbook runs automatically.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Trigger {
    /// Minimum incident severity; `None` never triggers.
    pub min_severity: Option<Severity>,
    /// Alert categories that trigger it; empty: any.
    pub categories: Vec<String>,
    /// Alert sources (rule ids) that trigger it; empty: any.
    #[serde(default)]
    pub rules: Vec<String>,
}

impl Trigger {
    /// Whether an alert of `category` raised by `source` matches the lists.
    pub fn matches_alert(&self, category: &str, source: &str) -> bool {
        (self.categories.is_empty() || self.categories.iter().any(|c| c == category))
            && (self.rules.is_empty() || self.rules.iter().any(|r| r == source))
    }
}

/// What a playbook is, independent of where it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaybookDef {
    /// Unique name within the tenant.
    #[serde(default)]
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Steps, in order.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Automatic trigger.
    pub trigger: Trigger,
    /// Whether runs may start.
    #[serde(default)]
    pub enabled: bool,
    /// Distinct approvers needed (0 means 1).
    #[serde(default)]
    pub required_approvals: u32,
}

/// Where a playbook is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// The tenant's own.
    Tenant,
    /// The built-in pack.
    Builtin,
    /// The server's playbooks directory.
    Directory,
}

/// A stored (tenant) or shared (built-in, directory) playbook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Playbook {
    /// Owner; `None` for shared playbooks.
    #[serde(default)]
    pub tenant_id: Option<TenantId>,
    /// Id (tenant: UUIDv7; shared: derived from origin and name).
    pub id: Uuid,
    /// Where it is defined.
    pub origin: Origin,
    /// Version, from 1.
    #[serde(default)]
    pub version: i64,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last updated.
    pub updated_at: DateTime<Utc>,
    /// The definition.
    pub def: PlaybookDef,
}

impl Playbook {
    /// A shared playbook of `origin` (its id derived from origin and name, so
    /// it is the same on every replica and across restarts).
    pub fn shared(origin: Origin, def: PlaybookDef, loaded_at: DateTime<Utc>) -> Self {
        Self {
            tenant_id: None,
            id: derived_id(&format!("picket/playbook/{origin:?}/{}", def.name)),
            origin,
            version: 1,
            created_at: loaded_at,
            updated_at: loaded_at,
            def,
        }
    }
}

/// A UUID (version 8) derived from `name` with SHA-256: stable, and unlike
/// any UUIDv7 the server assigns.
pub fn derived_id(name: &str) -> Uuid {
    let digest = Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::new_v8(bytes)
}

fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The templates in `value`: `Ok(names)` or the description of what is wrong.
pub fn templates_in(value: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err("`{{` without a closing `}}`".into());
        };
        let name = after[..end].trim();
        if !TEMPLATES.contains(&name) {
            return Err(format!(
                "unknown template `{{{{{name}}}}}` (known: {})",
                TEMPLATES
                    .iter()
                    .map(|t| format!("{{{{{t}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.push(name);
        rest = &after[end + 2..];
    }
    Ok(out)
}

/// Checks a parameter value of `kind` that holds no template.
fn check_value(kind: ParamKind, v: &str) -> Result<(), String> {
    match kind {
        ParamKind::Ip => v
            .parse::<std::net::IpAddr>()
            .map(|_| ())
            .map_err(|_| format!("`{v}` is not an IP address")),
        ParamKind::Actor => {
            if v.trim().is_empty() || v.len() > 256 {
                Err("must be 1..256 bytes".into())
            } else {
                Ok(())
            }
        }
        ParamKind::Text(max) => {
            if v.len() > max {
                Err(format!("at most {max} bytes"))
            } else {
                Ok(())
            }
        }
        ParamKind::Duration => match v.parse::<u64>() {
            Ok(n) if (DURATION_RANGE.0..=DURATION_RANGE.1).contains(&n) => Ok(()),
            _ => Err(format!(
                "whole seconds, {}..{}",
                DURATION_RANGE.0, DURATION_RANGE.1
            )),
        },
        ParamKind::Url => check_url(v),
        ParamKind::Rate => match v.parse::<u32>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(()),
            _ => Err("requests per minute, 1..1000000".into()),
        },
        ParamKind::Status => parse_incident_status(v)
            .map(|_| ())
            .ok_or_else(|| "one of open, investigating, contained, resolved, closed".into()),
    }
}

/// Checks a notification URL: absolute http or https with a host, no
/// credentials, at most [`MAX_URL_BYTES`]. Where it points is checked when it
/// is used (the resolved addresses, see `response::notify`).
pub fn check_url(v: &str) -> Result<(), String> {
    if v.len() > MAX_URL_BYTES {
        return Err(format!("at most {MAX_URL_BYTES} bytes"));
    }
    let uri: http::Uri = v.parse().map_err(|_| "not a URL".to_owned())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let Some(authority) = uri.authority() else {
        return Err("names no host".into());
    };
    if authority.as_str().contains('@') {
        return Err("must not carry credentials".into());
    }
    if authority.host().is_empty() {
        return Err("names no host".into());
    }
    Ok(())
}

impl PlaybookDef {
    /// Every violated rule, with field paths under `prefix` (e.g.
    /// `playbook.`): `playbook.steps[1].params[text]`.
    pub fn validate(&self, prefix: &str) -> Vec<FieldViolation> {
        let mut v = Vec::new();
        let mut bad = |field: String, description: String| {
            v.push(FieldViolation::new(format!("{prefix}{field}"), description))
        };
        if !is_name(&self.name, 128) {
            bad(
                "name".into(),
                "1..128 bytes of a-z, 0-9, '-' and '_'".into(),
            );
        }
        if self.description.len() > MAX_TEXT_BYTES {
            bad(
                "description".into(),
                format!("at most {MAX_TEXT_BYTES} bytes"),
            );
        }
        if self.required_approvals > MAX_APPROVALS {
            bad(
                "required_approvals".into(),
                format!("1..{MAX_APPROVALS} (or 0 for 1)"),
            );
        }
        if self.trigger.categories.len() > MAX_CATEGORIES
            || self
                .trigger
                .categories
                .iter()
                .any(|c| c.is_empty() || c.len() > 64)
        {
            bad(
                "trigger.categories".into(),
                format!("at most {MAX_CATEGORIES} categories of 1..64 bytes"),
            );
        }
        if self.trigger.rules.len() > 32
            || self
                .trigger
                .rules
                .iter()
                .any(|r| r.is_empty() || r.len() > 128)
        {
            bad(
                "trigger.rules".into(),
                "at most 32 rule ids of 1..128 bytes".into(),
            );
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            bad("steps".into(), format!("1..{MAX_STEPS} steps"));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let at = format!("steps[{i}]");
            if !is_name(&step.name, 64) {
                bad(
                    format!("{at}.name"),
                    "1..64 bytes of a-z, 0-9, '-' and '_'".into(),
                );
            } else if self.steps[..i].iter().any(|s| s.name == step.name) {
                bad(
                    format!("{at}.name"),
                    format!("step `{}` is named twice", step.name),
                );
            }
            if step.timeout_seconds > MAX_TIMEOUT_SECONDS {
                bad(
                    format!("{at}.timeout_seconds"),
                    format!("1..{MAX_TIMEOUT_SECONDS} (or 0 for {DEFAULT_TIMEOUT_SECONDS})"),
                );
            }
            if step.max_attempts > MAX_ATTEMPTS {
                bad(
                    format!("{at}.max_attempts"),
                    format!("1..{MAX_ATTEMPTS} (or 0 for {DEFAULT_ATTEMPTS})"),
                );
            }
            if step.params.len() > MAX_PARAMS {
                bad(
                    format!("{at}.params"),
                    format!("at most {MAX_PARAMS} parameters"),
                );
            }
            let specs = step.action.params();
            for (name, value) in &step.params {
                let field = format!("{at}.params[{name}]");
                let Some(spec) = specs.iter().find(|s| s.name == name) else {
                    bad(
                        field,
                        format!(
                            "step `{}`: {} takes no parameter `{name}` (it takes {})",
                            step.name,
                            step.action.as_str(),
                            specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                        ),
                    );
                    continue;
                };
                if value.len() > MAX_PARAM_BYTES {
                    bad(field, format!("at most {MAX_PARAM_BYTES} bytes"));
                    continue;
                }
                match templates_in(value) {
                    Err(e) => bad(field, format!("step `{}`: {e}", step.name)),
                    Ok(t) if !t.is_empty() => {
                        if matches!(
                            spec.kind,
                            ParamKind::Duration | ParamKind::Url | ParamKind::Rate
                        ) {
                            bad(
                                field,
                                format!("step `{}`: `{name}` takes no templates", step.name),
                            );
                        }
                    }
                    Ok(_) => {
                        if let Err(e) = check_value(spec.kind, value) {
                            bad(field, format!("step `{}`: {e}", step.name));
                        }
                    }
                }
            }
            for spec in specs.iter().filter(|s| s.required) {
                if !step.params.contains_key(spec.name) {
                    bad(
                        format!("{at}.params[{}]", spec.name),
                        format!(
                            "step `{}`: {} requires `{}`",
                            step.name,
                            step.action.as_str(),
                            spec.name
                        ),
                    );
                }
            }
            if step.action == ActionKind::Throttle
                && step.params.contains_key("ip") == step.params.contains_key("actor")
            {
                bad(
                    format!("{at}.params"),
                    format!(
                        "step `{}`: throttle takes exactly one of `ip` or `actor`",
                        step.name
                    ),
                );
            }
        }
        v
    }

    /// Whether any step requires approval.
    pub fn needs_approval(&self) -> bool {
        self.steps.iter().any(|s| s.requires_approval)
    }

    /// Distinct approvals a run needs.
    pub fn approvals_needed(&self) -> u32 {
        self.required_approvals.clamp(1, MAX_APPROVALS)
    }
}

/// What templates are filled in from.
#[derive(Debug, Clone, Default)]
pub struct TemplateContext<'a> {
    /// The incident the run responds to (or the alert's incident).
    pub incident: Option<&'a Incident>,
    /// The alert the run responds to.
    pub alert: Option<&'a Alert>,
}

impl TemplateContext<'_> {
    /// The value of one template, or why it has none.
    fn value(&self, name: &str) -> Result<String, String> {
        let entity = |kind: EntityKind| {
            let from_alert = self
                .alert
                .and_then(|a| a.body.entities.iter().find(|e| e.kind == kind));
            let from_incident = self
                .incident
                .and_then(|i| i.entities.iter().find(|e| e.kind == kind));
            from_alert.or(from_incident).map(|e| e.value.clone())
        };
        let found = match name {
            "incident.id" => self.incident.map(|i| i.id.to_string()),
            "incident.title" => self.incident.map(|i| i.title.clone()),
            "entity.ip" => entity(EntityKind::Ip),
            "entity.actor" => entity(EntityKind::Actor),
            "alert.id" => self
                .alert
                .map(|a| a.id)
                .or_else(|| self.incident.and_then(|i| i.alert_ids.last().copied()))
                .map(|id| id.to_string()),
            _ => None,
        };
        found.ok_or_else(|| match name {
            "entity.ip" => "the incident or alert names no IP address".into(),
            "entity.actor" => "the incident or alert names no actor".into(),
            "alert.id" => "the run has no alert".into(),
            _ => "the run has no incident".into(),
        })
    }

    /// `value` with its templates filled in.
    pub fn fill(&self, value: &str) -> Result<String, String> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| "`{{` without a closing `}}`".to_owned())?;
            let name = after[..end].trim();
            out.push_str(
                &self
                    .value(name)
                    .map_err(|why| format!("`{{{{{name}}}}}` has no value: {why}"))?,
            );
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Resolves a playbook's steps for a run: templates filled in, defaults
/// applied, every resolved value checked. An error names the step and
/// parameter (`steps[2].params[ip]`) and says why.
pub fn resolve_steps(
    def: &PlaybookDef,
    ctx: &TemplateContext<'_>,
) -> Result<Vec<ResolvedStep>, FieldViolation> {
    let mut out = Vec::with_capacity(def.steps.len());
    for (i, s) in def.steps.iter().enumerate() {
        if s.action.needs_incident() && ctx.incident.is_none() {
            return Err(FieldViolation::new(
                format!("steps[{i}]"),
                format!(
                    "step `{}` ({}) acts on an incident and the run has none",
                    s.name,
                    s.action.as_str()
                ),
            ));
        }
        let mut params = BTreeMap::new();
        for (name, value) in &s.params {
            let field = || format!("steps[{i}].params[{name}]");
            let filled = ctx
                .fill(value)
                .map_err(|e| FieldViolation::new(field(), format!("step `{}`: {e}", s.name)))?;
            if let Some(spec) = s.action.params().iter().find(|p| p.name == name) {
                check_value(spec.kind, &filled).map_err(|e| {
                    FieldViolation::new(
                        field(),
                        format!("step `{}`: resolved to an invalid value: {e}", s.name),
                    )
                })?;
            }
            params.insert(name.clone(), filled);
        }
        out.push(ResolvedStep {
            name: s.name.clone(),
            action: s.action,
            params,
            requires_approval: s.requires_approval,
            timeout_seconds: if s.timeout_seconds == 0 {
                DEFAULT_TIMEOUT_SECONDS
            } else {
                s.timeout_seconds
            },
            max_attempts: if s.max_attempts == 0 {
                DEFAULT_ATTEMPTS
            } else {
                s.max_attempts
            },
        });
    }
    Ok(out)
}

/// A step of a run with its parameters resolved: exactly what executes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedStep {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// What it does.
    pub action: ActionKind,
    /// Parameters after templates.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Whether it required approval.
    #[serde(default)]
    pub requires_approval: bool,
    /// Attempt timeout, seconds.
    #[serde(default)]
    pub timeout_seconds: u32,
    /// Attempts before failing.
    #[serde(default)]
    pub max_attempts: u32,
}

impl ResolvedStep {
    /// The decision duration it asks for (its parameter or the action's default).
    pub fn duration(&self) -> chrono::Duration {
        let secs = self
            .params
            .get("duration_seconds")
            .and_then(|d| d.parse::<u64>().ok())
            .unwrap_or_else(|| self.action.default_duration());
        chrono::Duration::seconds(secs as i64)
    }
}

/// Hex SHA-256 of the resolved steps (their canonical JSON: parameters sorted).
pub fn params_digest(steps: &[ResolvedStep]) -> String {
    let json = serde_json::to_vec(steps).expect("resolved steps serialize");
    hex::encode(Sha256::digest(&json))
}

/// State of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunStatus {
    /// Waiting for approvals.
    PendingApproval = 1,
    /// Runnable.
    Approved = 2,
    /// Rejected; terminal.
    Rejected = 3,
    /// Executing.
    Running = 4,
    /// Done; terminal.
    Succeeded = 5,
    /// A step failed; terminal.
    Failed = 6,
    /// Cancelled; terminal.
    Cancelled = 7,
    /// Not approved in time; terminal.
    Expired = 8,
}

impl RunStatus {
    /// Stored value.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// Lower-case name, for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingApproval => "pending_approval",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }

    /// Whether nothing more happens to the run.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Rejected | Self::Succeeded | Self::Failed | Self::Cancelled | Self::Expired
        )
    }
}

/// Progress of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepState {
    /// Not started.
    Pending,
    /// An attempt is in progress (or was cut off and resumes).
    Running,
    /// Done.
    Succeeded,
    /// Failed.
    Failed,
    /// Not run.
    Skipped,
}

/// What undoes a step's effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inverse {
    /// The enforcement decision to revoke.
    #[serde(default)]
    pub decision_id: String,
    /// What it undoes, for people.
    #[serde(default)]
    pub description: String,
}

/// How a step was undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undo {
    /// Who.
    #[serde(default)]
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// What was undone.
    #[serde(default)]
    pub description: String,
}

/// Progress and outcome of one step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// Step name.
    #[serde(default)]
    pub step: String,
    /// Progress.
    pub state: StepState,
    /// Attempts made (including one cut off by a crash).
    #[serde(default)]
    pub attempts: u32,
    /// Attempts that failed (the retry budget counts these).
    #[serde(default)]
    pub failures: u32,
    /// Outcome or error of the last attempt, for people.
    #[serde(default)]
    pub message: String,
    /// First attempt started.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// Finished.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The inverse it recorded, if any.
    #[serde(default)]
    pub inverse: Option<Inverse>,
    /// Set once undone.
    #[serde(default)]
    pub undo: Option<Undo>,
}

/// An approval decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who (bare API key id).
    #[serde(default)]
    pub decided_by: String,
    /// When.
    pub decided_at: DateTime<Utc>,
    /// Approve or reject.
    #[serde(default)]
    pub approved: bool,
    /// Comment.
    #[serde(default)]
    pub comment: String,
    /// The params digest decided on.
    #[serde(default)]
    pub params_digest: String,
}

/// Why a change to a run was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunRefusal {
    /// The caller may not do this (approving their own run).
    PermissionDenied(String),
    /// The run is not in a state that allows it.
    FailedPrecondition(String),
    /// The run's approval deadline passed: it must expire.
    Expired,
}

/// A run of a playbook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaybookRun {
    /// Owner.
    pub tenant_id: TenantId,
    /// Id (UUIDv7).
    pub id: Uuid,
    /// Optimistic-concurrency version, bumped on every save.
    #[serde(default)]
    pub version: i64,
    /// Playbook.
    pub playbook_id: Uuid,
    /// Playbook name.
    #[serde(default)]
    pub playbook_name: String,
    /// Playbook version used.
    #[serde(default)]
    pub playbook_version: i64,
    /// Incident.
    #[serde(default)]
    pub incident_id: Option<Uuid>,
    /// Alert.
    #[serde(default)]
    pub alert_id: Option<Uuid>,
    /// State.
    pub status: RunStatus,
    /// Who requested it (`system` for triggered runs).
    #[serde(default)]
    pub requested_by: String,
    /// Whether its trigger created it.
    #[serde(default)]
    pub automatic: bool,
    /// `auto:<playbook>:<incident>` for triggered runs: at most one each.
    #[serde(default)]
    pub trigger_key: Option<String>,
    /// Distinct approvals needed.
    #[serde(default)]
    pub required_approvals: u32,
    /// Approval deadline.
    pub approval_deadline: DateTime<Utc>,
    /// The resolved steps.
    #[serde(default)]
    pub steps: Vec<ResolvedStep>,
    /// Digest of `steps`.
    #[serde(default)]
    pub params_digest: String,
    /// Decisions, oldest first.
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// One per step.
    #[serde(default)]
    pub results: Vec<StepResult>,
    /// Why it ended that way.
    #[serde(default)]
    pub status_reason: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// Reached a terminal state.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Who requests triggered runs.
pub const SYSTEM: &str = "system";

impl PlaybookRun {
    /// A new run of `playbook` with `steps` resolved: PENDING_APPROVAL if any
    /// step requires approval, else APPROVED.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tenant: TenantId,
        playbook: &Playbook,
        steps: Vec<ResolvedStep>,
        incident_id: Option<Uuid>,
        alert_id: Option<Uuid>,
        requested_by: &str,
        approval_timeout: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Self {
        let status = if playbook.def.needs_approval() {
            RunStatus::PendingApproval
        } else {
            RunStatus::Approved
        };
        let results = steps
            .iter()
            .map(|s| StepResult {
                step: s.name.clone(),
                state: StepState::Pending,
                attempts: 0,
                failures: 0,
                message: String::new(),
                started_at: None,
                finished_at: None,
                inverse: None,
                undo: None,
            })
            .collect();
        Self {
            tenant_id: tenant,
            id: Uuid::now_v7(),
            version: 0,
            playbook_id: playbook.id,
            playbook_name: playbook.def.name.clone(),
            playbook_version: playbook.version,
            incident_id,
            alert_id,
            status,
            requested_by: requested_by.to_owned(),
            automatic: false,
            trigger_key: None,
            required_approvals: playbook.def.approvals_needed(),
            approval_deadline: now + approval_timeout,
            params_digest: params_digest(&steps),
            steps,
            approvals: Vec::new(),
            results,
            status_reason: String::new(),
            created_at: now,
            updated_at: now,
            finished_at: None,
        }
    }

    /// The trigger key of an automatic run of `playbook` for `incident`.
    pub fn trigger_key(playbook: Uuid, incident: Uuid) -> String {
        format!("auto:{playbook}:{incident}")
    }

    fn pending(&self, what: &str, now: DateTime<Utc>) -> Result<(), RunRefusal> {
        if self.status != RunStatus::PendingApproval {
            return Err(RunRefusal::FailedPrecondition(format!(
                "cannot {what} a run that is {} (only runs waiting for approval)",
                self.status.as_str()
            )));
        }
        if now >= self.approval_deadline {
            return Err(RunRefusal::Expired);
        }
        Ok(())
    }

    /// Records an approval by `by`; the one reaching `required_approvals`
    /// makes the run APPROVED.
    pub fn approve(
        &mut self,
        by: &str,
        comment: &str,
        digest: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), RunRefusal> {
        self.pending("approve", now)?;
        if by == self.requested_by {
            return Err(RunRefusal::PermissionDenied(
                "the requester of a run cannot approve it".into(),
            ));
        }
        if self.approvals.iter().any(|a| a.decided_by == by) {
            return Err(RunRefusal::FailedPrecondition(
                "this key has approved the run already; another approver is needed".into(),
            ));
        }
        if let Some(d) = digest.filter(|d| !d.is_empty())
            && d != self.params_digest
        {
            return Err(RunRefusal::FailedPrecondition(format!(
                "params_digest {d} is not the run's ({}): its parameters differ from the ones shown",
                self.params_digest
            )));
        }
        self.approvals.push(Approval {
            decided_by: by.to_owned(),
            decided_at: now,
            approved: true,
            comment: comment.to_owned(),
            params_digest: self.params_digest.clone(),
        });
        if self.approvals.iter().filter(|a| a.approved).count() as u32 >= self.required_approvals {
            self.status = RunStatus::Approved;
        }
        self.updated_at = now;
        Ok(())
    }

    /// Records a rejection; the run is REJECTED.
    pub fn reject(
        &mut self,
        by: &str,
        comment: &str,
        now: DateTime<Utc>,
    ) -> Result<(), RunRefusal> {
        self.pending("reject", now)?;
        self.approvals.push(Approval {
            decided_by: by.to_owned(),
            decided_at: now,
            approved: false,
            comment: comment.to_owned(),
            params_digest: self.params_digest.clone(),
        });
        self.finish(
            RunStatus::Rejected,
            format!("rejected by {by}: {comment}"),
            now,
        );
        Ok(())
    }

    /// Cancels an unfinished run.
    pub fn cancel(&mut self, by: &str, reason: &str, now: DateTime<Utc>) -> Result<(), RunRefusal> {
        if self.status.is_terminal() {
            return Err(RunRefusal::FailedPrecondition(format!(
                "the run is {} already",
                self.status.as_str()
            )));
        }
        let why = if reason.is_empty() {
            format!("cancelled by {by}")
        } else {
            format!("cancelled by {by}: {reason}")
        };
        self.finish(RunStatus::Cancelled, why, now);
        Ok(())
    }

    /// Expires a run whose approval deadline passed.
    pub fn expire(&mut self, now: DateTime<Utc>) -> bool {
        if self.status != RunStatus::PendingApproval || now < self.approval_deadline {
            return false;
        }
        self.finish(
            RunStatus::Expired,
            format!(
                "not approved by the deadline ({})",
                self.approval_deadline.to_rfc3339()
            ),
            now,
        );
        true
    }

    /// Moves to a terminal state; steps that never started are SKIPPED.
    pub fn finish(&mut self, status: RunStatus, reason: String, now: DateTime<Utc>) {
        debug_assert!(status.is_terminal());
        self.status = status;
        self.status_reason = reason;
        self.finished_at = Some(now);
        self.updated_at = now;
        for r in &mut self.results {
            if r.state == StepState::Pending {
                r.state = StepState::Skipped;
            }
        }
    }

    /// The first step not finished yet (where a run, taken over, continues).
    pub fn next_step(&self) -> Option<usize> {
        self.results
            .iter()
            .position(|r| matches!(r.state, StepState::Pending | StepState::Running))
    }

    /// Records `by` undoing step `index`.
    pub fn undo(
        &mut self,
        index: usize,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Inverse, RunRefusal> {
        let r = &mut self.results[index];
        if r.state != StepState::Succeeded {
            return Err(RunRefusal::FailedPrecondition(format!(
                "step `{}` did not succeed; there is nothing to undo",
                r.step
            )));
        }
        if r.undo.is_some() {
            return Err(RunRefusal::FailedPrecondition(format!(
                "step `{}` was undone already",
                r.step
            )));
        }
        let Some(inverse) = r.inverse.clone() else {
            return Err(RunRefusal::FailedPrecondition(format!(
                "step `{}` has no inverse to run",
                r.step
            )));
        };
        r.undo = Some(Undo {
            by: by.to_owned(),
            at: now,
            reason: reason.to_owned(),
            description: format!("undid: {}", inverse.description),
        });
        self.updated_at = now;
        Ok(inverse)
    }

    /// The effect-idempotency key of step `index`: the same on every attempt.
    pub fn effect_key(&self, index: usize) -> String {
        format!("run:{}:step:{index}", self.id)
    }
}

/// Which runs to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    /// Of this playbook.
    pub playbook_id: Option<Uuid>,
    /// For this incident.
    pub incident_id: Option<Uuid>,
    /// In these states (any of); empty: all.
    pub statuses: Vec<RunStatus>,
    /// Keyset: strictly older than (created_at, id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    /// Most rows.
    pub limit: u32,
}

impl RunQuery {
    /// Whether a run matches (not the keyset).
    pub fn matches(&self, r: &PlaybookRun) -> bool {
        self.playbook_id.is_none_or(|p| p == r.playbook_id)
            && self.incident_id.is_none_or(|i| Some(i) == r.incident_id)
            && (self.statuses.is_empty() || self.statuses.contains(&r.status))
    }
}

/// A tenant's notification settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationSettings {
    /// Owner.
    pub tenant_id: TenantId,
    /// Default notification URL ("" for none).
    pub url: String,
    /// The outbound signing secret, sealed (never in clear).
    pub sealed_secret: Option<Vec<u8>>,
    /// When the secret was last replaced.
    pub secret_rotated_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, action: ActionKind, params: &[(&str, &str)]) -> Step {
        Step {
            name: name.into(),
            action,
            params: params
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            requires_approval: false,
            timeout_seconds: 0,
            max_attempts: 0,
        }
    }

    fn def(steps: Vec<Step>) -> PlaybookDef {
        PlaybookDef {
            name: "contain".into(),
            description: String::new(),
            steps,
            trigger: Trigger::default(),
            enabled: true,
            required_approvals: 0,
        }
    }

    #[test]
    fn unknown_templates_and_parameters_name_step_and_parameter() {
        let d = def(vec![
            step("block", ActionKind::BlockIp, &[("ip", "{{entity.ip}}")]),
            step(
                "note",
                ActionKind::AddIncidentNote,
                &[("text", "owner {{incident.owner}}")],
            ),
            step("notify", ActionKind::NotifyWebhook, &[("colour", "red")]),
            step(
                "status",
                ActionKind::SetIncidentStatus,
                &[("status", "done")],
            ),
            step(
                "t",
                ActionKind::Throttle,
                &[("ip", "1.2.3.4"), ("actor", "x")],
            ),
            step(
                "b2",
                ActionKind::BlockIp,
                &[("ip", "nope"), ("duration_seconds", "5")],
            ),
        ]);
        let v = d.validate("playbook.");
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "playbook.steps[1].params[text]",
                "playbook.steps[2].params[colour]",
                "playbook.steps[3].params[status]",
                "playbook.steps[4].params",
                "playbook.steps[5].params[duration_seconds]",
                "playbook.steps[5].params[ip]",
            ]
        );
        assert!(
            v[0].description.contains("step `note`"),
            "{}",
            v[0].description
        );
        assert!(
            v[0].description.contains("{{incident.owner}}"),
            "{}",
            v[0].description
        );
    }

    #[test]
    fn templates_fill_from_the_incident_and_fail_when_missing() {
        let mut inc = Incident::new(
            TenantId(Uuid::nil()),
            "Brute force".into(),
            String::new(),
            Severity::High,
            Utc::now(),
        );
        inc.entities.push(crate::domain::alert::Entity {
            kind: EntityKind::Ip,
            value: "203.0.113.7".into(),
        });
        let ctx = TemplateContext {
            incident: Some(&inc),
            alert: None,
        };
        let d = def(vec![
            step("block", ActionKind::BlockIp, &[("ip", "{{ entity.ip }}")]),
            step(
                "note",
                ActionKind::AddIncidentNote,
                &[("text", "blocked {{entity.ip}} for {{incident.title}}")],
            ),
        ]);
        let steps = resolve_steps(&d, &ctx).unwrap();
        assert_eq!(steps[0].params["ip"], "203.0.113.7");
        assert_eq!(
            steps[1].params["text"],
            "blocked 203.0.113.7 for Brute force"
        );
        let missing = def(vec![step(
            "disable",
            ActionKind::DisableActor,
            &[("actor", "{{entity.actor}}")],
        )]);
        let err = resolve_steps(&missing, &ctx).unwrap_err();
        assert_eq!(err.field, "steps[0].params[actor]");
        assert!(
            err.description.contains("names no actor"),
            "{}",
            err.description
        );
    }

    #[test]
    fn approvals_need_distinct_approvers_other_than_the_requester() {
        let pb = Playbook::shared(
            Origin::Builtin,
            PlaybookDef {
                required_approvals: 2,
                ..def(vec![Step {
                    requires_approval: true,
                    ..step("note", ActionKind::NotifyWebhook, &[])
                }])
            },
            Utc::now(),
        );
        let now = Utc::now();
        let mut run = PlaybookRun::new(
            TenantId(Uuid::nil()),
            &pb,
            Vec::new(),
            None,
            None,
            "alice",
            chrono::Duration::seconds(60),
            now,
        );
        assert_eq!(run.status, RunStatus::PendingApproval);
        assert!(matches!(
            run.approve("alice", "", None, now),
            Err(RunRefusal::PermissionDenied(_))
        ));
        run.approve("bob", "", None, now).unwrap();
        assert_eq!(run.status, RunStatus::PendingApproval);
        assert!(matches!(
            run.approve("bob", "", None, now),
            Err(RunRefusal::FailedPrecondition(_))
        ));
        assert!(matches!(
            run.approve("carol", "", Some("00"), now),
            Err(RunRefusal::FailedPrecondition(_))
        ));
        let digest = run.params_digest.clone();
        run.approve("carol", "", Some(&digest), now).unwrap();
        assert_eq!(run.status, RunStatus::Approved);
        assert!(matches!(
            run.approve("dave", "", None, now),
            Err(RunRefusal::FailedPrecondition(_))
        ));
        let mut late = run.clone();
        late.status = RunStatus::PendingApproval;
        assert_eq!(
            late.approve("erin", "", None, now + chrono::Duration::seconds(61)),
            Err(RunRefusal::Expired)
        );
    }

    #[test]
    fn urls_must_be_http_without_credentials() {
        assert!(check_url("https://hooks.example.com/x?y=1").is_ok());
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_url("ftp://example.com/").is_err());
        assert!(check_url("https://user:pw@example.com/").is_err());
        assert!(check_url("/relative").is_err());
    }
}
