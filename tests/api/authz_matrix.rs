//! The authorization matrix: every method of every `picket.v1` service,
//! enumerated from the descriptor set the server serves for reflection (not
//! from a hand-written list), called
//!
//! 1. with no key, with a forged key (a real key id, a wrong secret) and
//!    with a revoked key: UNAUTHENTICATED;
//! 2. with a key of the same tenant holding every scope but the method's
//!    (for operator-only methods: a tenant key holding every scope):
//!    PERMISSION_DENIED; outside AdminService, with the operator token
//!    (which has no tenant): PERMISSION_DENIED;
//! 3. with another tenant's key and this tenant's ids, cursors and page
//!    tokens: what `Cross` says (NOT_FOUND, PERMISSION_DENIED for a named
//!    tenant, INVALID_ARGUMENT for a cursor bound to its tenant, or an answer
//!    holding nothing of the first tenant's, checked against a control: the
//!    first tenant's own call does return its data);
//!
//! then the rows of `MIXED` (the other tenant's own objects beside one of
//! the first tenant's in one request, and the first tenant's actors and
//! addresses as filters), the no-key and wrong-scope calls again over
//! grpc-web (HTTP/1.1), and the webhook route with no signature, a wrong
//! one, another source's and one over another body. Afterwards the first
//! tenant's objects read back exactly as before. Requests are built from
//! the text-format templates of `MATRIX` with prost-reflect and sent as raw
//! bytes, so one code path calls every method.
//!
//! `MATRIX` is the authorization decision of every RPC: a method the
//! descriptor set has and the table lacks fails the test (so no RPC ships
//! without one), and so does an entry naming a method that no longer exists.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use picket::grpc::pb;
use picket::storage::Backend;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use sha2::Sha256;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{self, OPERATOR_TOKEN, TestApp, http1, with_key};

/// What a method demands of its caller.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Any valid credential.
    Authenticated,
    /// A key holding this scope.
    Scope(pb::Scope),
    /// The operator token (the admin scope, and no tenant key however scoped).
    Operator,
}

/// What tenant B's key (holding every scope) gets when it sends the
/// template filled with tenant A's ids, cursors and page tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cross {
    /// Not called: the method takes no id or cursor (creates, ingest, the
    /// caller's own settings, operator-only methods).
    None,
    /// Takes no id of A's; B's answer holds nothing of A's.
    Own,
    /// A's ids: NOT_FOUND.
    NotFound,
    /// A's tenant id: PERMISSION_DENIED (a key acts only on its own tenant).
    Denied,
    /// INVALID_ARGUMENT, as for an id or cursor that never existed: a
    /// cursor or page token bound to A's tenant, an alert not linked to
    /// B's incident.
    Invalid,
    /// A's id as a filter or an unbound keyset position: answered, and the
    /// answer holds nothing of A's.
    Empty,
}

/// One row of the matrix.
struct Entry {
    /// `Service/Method` within `picket.v1`.
    method: &'static str,
    /// Who may call it.
    access: Access,
    /// The request, in protobuf text format; `$name` is replaced by tenant
    /// A's value of `name` (see `Fixture::vars`).
    request: &'static str,
    /// Tenant B with A's ids.
    cross: Cross,
}

use Access::{Authenticated, Operator};
use Cross::{Denied, Empty, Invalid, NotFound, Own};

const INGEST: Access = Access::Scope(pb::Scope::Ingest);
const READ: Access = Access::Scope(pb::Scope::Read);
const RESPOND: Access = Access::Scope(pb::Scope::Respond);
const ADMIN: Access = Access::Scope(pb::Scope::Admin);

const fn rpc(method: &'static str, access: Access, cross: Cross, request: &'static str) -> Entry {
    Entry {
        method,
        access,
        request,
        cross,
    }
}

/// Every RPC's authorization decision.
const MATRIX: &[Entry] = &[
    // AdminService
    rpc("AdminService/WhoAmI", Authenticated, Own, ""),
    rpc(
        "AdminService/CreateTenant",
        Operator,
        Cross::None,
        r#"name: "matrix-new""#,
    ),
    rpc(
        "AdminService/GetTenant",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant""#,
    ),
    rpc(
        "AdminService/ListTenants",
        Operator,
        Cross::None,
        "page_size: 1",
    ),
    rpc(
        "AdminService/UpdateTenant",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant" update_mask: "display_name" display_name: "changed""#,
    ),
    rpc(
        "AdminService/CreateApiKey",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant" name: "matrix" scopes: SCOPE_ADMIN"#,
    ),
    rpc(
        "AdminService/ListApiKeys",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant""#,
    ),
    rpc(
        "AdminService/RevokeApiKey",
        ADMIN,
        NotFound,
        r#"key_id: "$key""#,
    ),
    rpc(
        "AdminService/CreateWebhookSource",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant" name: "matrix-new-hook""#,
    ),
    rpc(
        "AdminService/ListWebhookSources",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant""#,
    ),
    rpc(
        "AdminService/RotateWebhookSecret",
        ADMIN,
        NotFound,
        r#"source_id: "$source""#,
    ),
    rpc(
        "AdminService/DeleteWebhookSource",
        ADMIN,
        NotFound,
        r#"source_id: "$source""#,
    ),
    rpc(
        "AdminService/CreateRule",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant" sigma_yaml: "$sigma" enabled: true"#,
    ),
    rpc(
        "AdminService/GetRule",
        ADMIN,
        NotFound,
        r#"rule_id: "$rule""#,
    ),
    rpc(
        "AdminService/ListRules",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant""#,
    ),
    rpc(
        "AdminService/UpdateRule",
        ADMIN,
        NotFound,
        r#"rule_id: "$rule" sigma_yaml: "$sigma""#,
    ),
    rpc(
        "AdminService/SetRuleEnabled",
        ADMIN,
        NotFound,
        r#"rule_id: "$rule" enabled: false"#,
    ),
    // The rule text is the caller's own input: there is no id of A's to send.
    rpc(
        "AdminService/ValidateRule",
        ADMIN,
        Cross::None,
        r#"sigma_yaml: "$sigma""#,
    ),
    rpc(
        "AdminService/DeleteRule",
        ADMIN,
        NotFound,
        r#"rule_id: "$rule""#,
    ),
    rpc(
        "AdminService/PurgeEvents",
        ADMIN,
        Denied,
        r#"tenant_id: "$tenant" before { seconds: $end }"#,
    ),
    // AlertService
    rpc(
        "AlertService/ListAlerts",
        READ,
        Empty,
        r#"page_size: 1 page_token: "$alerts_page""#,
    ),
    rpc(
        "AlertService/GetAlert",
        READ,
        NotFound,
        r#"alert_id: "$alert""#,
    ),
    rpc(
        "AlertService/GetAlertContext",
        READ,
        NotFound,
        r#"alert_id: "$alert""#,
    ),
    rpc(
        "AlertService/UpdateAlert",
        RESPOND,
        NotFound,
        r#"alert_id: "$alert" status: ALERT_STATUS_ACKNOWLEDGED note: "matrix""#,
    ),
    rpc(
        "AlertService/WatchAlerts",
        READ,
        Invalid,
        r#"options { after_cursor: "$alerts_cursor" heartbeat_interval_seconds: 1 }"#,
    ),
    // On-demand analysis of the caller's own events: no id of A's to send
    // (B, with no history, is refused for want of it).
    rpc(
        "AlertService/RunDetection",
        RESPOND,
        Cross::None,
        "time_range { start { seconds: $start } end { seconds: $end } }",
    ),
    // EnforcementService
    rpc(
        "EnforcementService/CheckAccess",
        READ,
        Own,
        r#"ip: "$banned_ip""#,
    ),
    rpc(
        "EnforcementService/WatchDecisions",
        READ,
        Own,
        "heartbeat_interval_seconds: 1",
    ),
    rpc(
        "EnforcementService/CreateDecision",
        RESPOND,
        NotFound,
        r#"decision { scope: DECISION_SCOPE_IP value: "192.0.2.200" type: DECISION_TYPE_BAN
           duration_seconds: 3600 reason: "matrix" alert_id: "$alert" }"#,
    ),
    rpc(
        "EnforcementService/CreateDecisions",
        RESPOND,
        NotFound,
        r#"decisions { scope: DECISION_SCOPE_IP value: "192.0.2.201" type: DECISION_TYPE_BAN
           duration_seconds: 3600 reason: "matrix" alert_id: "$alert" }"#,
    ),
    rpc(
        "EnforcementService/RevokeDecision",
        RESPOND,
        NotFound,
        r#"decision_id: "$decision" reason: "matrix""#,
    ),
    rpc(
        "EnforcementService/ListDecisions",
        READ,
        Empty,
        r#"page_size: 1 page_token: "$decisions_page""#,
    ),
    rpc(
        "EnforcementService/GetDecision",
        READ,
        NotFound,
        r#"decision_id: "$decision""#,
    ),
    // IncidentService
    rpc(
        "IncidentService/CreateIncident",
        RESPOND,
        NotFound,
        r#"title: "matrix" severity: SEVERITY_HIGH alert_ids: "$alert""#,
    ),
    rpc(
        "IncidentService/GetIncident",
        READ,
        NotFound,
        r#"incident_id: "$incident""#,
    ),
    rpc(
        "IncidentService/ListIncidents",
        READ,
        Empty,
        r#"page_size: 1 page_token: "$incidents_page""#,
    ),
    rpc(
        "IncidentService/UpdateIncident",
        RESPOND,
        NotFound,
        r#"incident_id: "$incident" update_mask: "status" status: INCIDENT_STATUS_INVESTIGATING"#,
    ),
    rpc(
        "IncidentService/AddNote",
        RESPOND,
        NotFound,
        r#"incident_id: "$incident" text: "matrix""#,
    ),
    rpc(
        "IncidentService/LinkAlerts",
        RESPOND,
        NotFound,
        r#"incident_id: "$incident" alert_ids: "$alert2""#,
    ),
    rpc(
        "IncidentService/UnlinkAlerts",
        RESPOND,
        NotFound,
        r#"incident_id: "$incident" alert_ids: "$alert""#,
    ),
    rpc(
        "IncidentService/MergeIncidents",
        RESPOND,
        NotFound,
        r#"target_incident_id: "$incident" source_incident_ids: "$incident2""#,
    ),
    rpc(
        "IncidentService/WatchIncident",
        READ,
        NotFound,
        r#"incident_id: "$incident" options { heartbeat_interval_seconds: 1 }"#,
    ),
    rpc(
        "IncidentService/WatchIncidents",
        READ,
        Invalid,
        r#"options { after_cursor: "$incidents_cursor" heartbeat_interval_seconds: 1 }"#,
    ),
    // IngestService
    rpc(
        "IngestService/Ingest",
        INGEST,
        Cross::None,
        "events { $event }",
    ),
    rpc(
        "IngestService/IngestStream",
        INGEST,
        Cross::None,
        "sequence: 1 events { $event }",
    ),
    rpc(
        "IngestService/QueryEvents",
        READ,
        Invalid,
        r#"time_range { start { seconds: $start } end { seconds: $end } }
           page_size: 1 page_token: "$events_page""#,
    ),
    rpc(
        "IngestService/TailEvents",
        READ,
        Invalid,
        r#"options { after_cursor: "$tail_cursor" heartbeat_interval_seconds: 1 }"#,
    ),
    // PlaybookService
    rpc(
        "PlaybookService/CreatePlaybook",
        ADMIN,
        Cross::None,
        r#"playbook { name: "matrix-new" enabled: true $steps }"#,
    ),
    rpc(
        "PlaybookService/GetPlaybook",
        READ,
        NotFound,
        r#"playbook_id: "$playbook""#,
    ),
    rpc(
        "PlaybookService/ListPlaybooks",
        READ,
        Empty,
        // Playbooks page by name: after the built-in pack's first two come A's.
        r#"page_size: 2 page_token: "$playbooks_page""#,
    ),
    rpc(
        "PlaybookService/UpdatePlaybook",
        ADMIN,
        NotFound,
        r#"playbook { id: "$playbook" name: "matrix-a-first" enabled: true version: 1 $steps }"#,
    ),
    rpc(
        "PlaybookService/DeletePlaybook",
        ADMIN,
        NotFound,
        r#"playbook_id: "$playbook""#,
    ),
    rpc(
        "PlaybookService/StartPlaybookRun",
        RESPOND,
        NotFound,
        r#"playbook_id: "$playbook" incident_id: "$incident""#,
    ),
    rpc(
        "PlaybookService/GetPlaybookRun",
        READ,
        NotFound,
        r#"run_id: "$run""#,
    ),
    rpc(
        "PlaybookService/ListPlaybookRuns",
        READ,
        Empty,
        r#"playbook_id: "$playbook" page_size: 1 page_token: "$runs_page""#,
    ),
    rpc(
        "PlaybookService/ApprovePlaybookRun",
        RESPOND,
        NotFound,
        r#"run_id: "$run" comment: "matrix" params_digest: "$digest""#,
    ),
    rpc(
        "PlaybookService/RejectPlaybookRun",
        RESPOND,
        NotFound,
        r#"run_id: "$run" comment: "matrix""#,
    ),
    rpc(
        "PlaybookService/CancelPlaybookRun",
        RESPOND,
        NotFound,
        r#"run_id: "$run" reason: "matrix""#,
    ),
    rpc(
        "PlaybookService/UndoPlaybookStep",
        RESPOND,
        NotFound,
        r#"run_id: "$run" step: "note" reason: "matrix""#,
    ),
    rpc(
        "PlaybookService/WatchPlaybookRuns",
        READ,
        Invalid,
        r#"options { after_cursor: "$runs_cursor" heartbeat_interval_seconds: 1 }"#,
    ),
    rpc("PlaybookService/GetNotificationSettings", ADMIN, Own, ""),
    rpc(
        "PlaybookService/UpdateNotificationSettings",
        ADMIN,
        Cross::None,
        r#"url: "https://hooks.example.com/matrix""#,
    ),
    rpc(
        "PlaybookService/RotateNotificationSecret",
        ADMIN,
        Cross::None,
        "",
    ),
    // ReportService
    rpc(
        "ReportService/GetAccessReport",
        READ,
        Invalid,
        r#"time_range { start { seconds: $start } end { seconds: $end } }
           group_by: ACCESS_GROUPING_ACTOR_SOURCE_IP page_size: 1 page_token: "$access_page""#,
    ),
    rpc(
        "ReportService/GetSecuritySummary",
        READ,
        Own,
        "period: REPORT_PERIOD_DAILY",
    ),
    rpc(
        "ReportService/GetDashboardMetrics",
        READ,
        Own,
        "period: REPORT_PERIOD_DAILY",
    ),
    rpc(
        "ReportService/ExportEvents",
        READ,
        Invalid,
        r#"time_range { start { seconds: $start } end { seconds: $end } }
           after_cursor: "$export_cursor""#,
    ),
];

/// Tenant B's own object beside one of A's in the same request (B's key,
/// every scope): the id of A's must be refused however the request is
/// otherwise B's, or filter B's answer to nothing of A's. `$b_incident` and
/// `$b_playbook` are B's.
const MIXED: &[(&str, Cross, &str)] = &[
    (
        "IncidentService/CreateIncident",
        NotFound,
        r#"title: "mixed" severity: SEVERITY_HIGH alert_ids: "$b_alert" alert_ids: "$alert""#,
    ),
    (
        "IncidentService/LinkAlerts",
        NotFound,
        r#"incident_id: "$b_incident" alert_ids: "$alert""#,
    ),
    // A's alert is not linked to B's incident, exactly as an alert that
    // never existed (next row) is not.
    (
        "IncidentService/UnlinkAlerts",
        Invalid,
        r#"incident_id: "$b_incident" alert_ids: "$alert""#,
    ),
    (
        "IncidentService/UnlinkAlerts",
        Invalid,
        r#"incident_id: "$b_incident" alert_ids: "$nobody""#,
    ),
    (
        "IncidentService/LinkAlerts",
        NotFound,
        r#"incident_id: "$b_incident" alert_ids: "$nobody""#,
    ),
    (
        "IncidentService/MergeIncidents",
        NotFound,
        r#"target_incident_id: "$b_incident" source_incident_ids: "$incident""#,
    ),
    (
        "IncidentService/MergeIncidents",
        NotFound,
        r#"target_incident_id: "$incident" source_incident_ids: "$b_incident""#,
    ),
    (
        "PlaybookService/StartPlaybookRun",
        NotFound,
        r#"playbook_id: "$b_playbook" incident_id: "$incident""#,
    ),
    (
        "PlaybookService/StartPlaybookRun",
        NotFound,
        r#"playbook_id: "$b_playbook" alert_id: "$alert""#,
    ),
    (
        "PlaybookService/StartPlaybookRun",
        NotFound,
        r#"playbook_id: "$playbook" incident_id: "$b_incident""#,
    ),
    (
        "PlaybookService/ListPlaybookRuns",
        Empty,
        r#"incident_id: "$incident""#,
    ),
    (
        "PlaybookService/ListPlaybookRuns",
        Empty,
        r#"playbook_id: "$playbook""#,
    ),
    (
        "PlaybookService/WatchPlaybookRuns",
        Empty,
        r#"playbook_id: "$playbook" options { heartbeat_interval_seconds: 1 }"#,
    ),
    (
        "EnforcementService/ListDecisions",
        Empty,
        r#"include_inactive: true origin_id: "$alert""#,
    ),
    (
        "EnforcementService/CreateDecision",
        NotFound,
        r#"decision { scope: DECISION_SCOPE_IP value: "192.0.2.202" type: DECISION_TYPE_BAN
           duration_seconds: 3600 reason: "mixed" alert_id: "$alert" }"#,
    ),
    // A's actors, addresses and decisions as filters.
    (
        "IngestService/QueryEvents",
        Empty,
        r#"time_range { start { seconds: $start } end { seconds: $end } } filter { actor: "alice-a" }"#,
    ),
    (
        "ReportService/ExportEvents",
        Empty,
        r#"time_range { start { seconds: $start } end { seconds: $end } }
           filter { source_ip: "203.0.113.77" }"#,
    ),
    (
        "ReportService/GetAccessReport",
        Empty,
        r#"time_range { start { seconds: $start } end { seconds: $end } }
           group_by: ACCESS_GROUPING_ACTOR_SOURCE_IP actor: "alice-a""#,
    ),
    (
        "AlertService/ListAlerts",
        Empty,
        r#"filter { entity { kind: ENTITY_KIND_IP value: "203.0.113.77" } }"#,
    ),
    (
        "IncidentService/ListIncidents",
        Empty,
        r#"filter { entity { kind: ENTITY_KIND_IP value: "203.0.113.77" } }"#,
    ),
    (
        "EnforcementService/ListDecisions",
        Empty,
        r#"scope: DECISION_SCOPE_IP value: "$banned_ip" include_inactive: true"#,
    ),
    (
        "AdminService/GetRule",
        Denied,
        r#"tenant_id: "$tenant" rule_id: "$rule""#,
    ),
    (
        "AdminService/RevokeApiKey",
        NotFound,
        r#"key_id: "$key_without_read""#,
    ),
];

/// Tenant A's cursors and page tokens, each taken from the first answer of
/// A's own call: (variable, method, request, response fields: the first
/// non-empty of `|`-separated dotted paths; a watch stream's first message
/// may be a heartbeat, which carries the head cursor). The matrix
/// sends the same request with the token, so only the tenant differs.
const TOKENS: &[(&str, &str, &str, &str)] = &[
    (
        "alerts_page",
        "AlertService/ListAlerts",
        "page_size: 1",
        "next_page_token",
    ),
    (
        "alerts_cursor",
        "AlertService/WatchAlerts",
        "options { heartbeat_interval_seconds: 1 }",
        "cursor|heartbeat.head_cursor",
    ),
    (
        "decisions_page",
        "EnforcementService/ListDecisions",
        "page_size: 1",
        "next_page_token",
    ),
    (
        "incidents_page",
        "IncidentService/ListIncidents",
        "page_size: 1",
        "next_page_token",
    ),
    (
        "incidents_cursor",
        "IncidentService/WatchIncidents",
        "options { heartbeat_interval_seconds: 1 }",
        "cursor|heartbeat.head_cursor",
    ),
    (
        "events_page",
        "IngestService/QueryEvents",
        "time_range { start { seconds: $start } end { seconds: $end } } page_size: 1",
        "next_page_token",
    ),
    (
        "tail_cursor",
        "IngestService/TailEvents",
        "options { heartbeat_interval_seconds: 1 }",
        "cursor|heartbeat.head_cursor",
    ),
    (
        "playbooks_page",
        "PlaybookService/ListPlaybooks",
        "page_size: 2",
        "next_page_token",
    ),
    (
        "runs_page",
        "PlaybookService/ListPlaybookRuns",
        r#"playbook_id: "$playbook" page_size: 1"#,
        "next_page_token",
    ),
    (
        "runs_cursor",
        "PlaybookService/WatchPlaybookRuns",
        "options { heartbeat_interval_seconds: 1 }",
        "cursor|heartbeat.head_cursor",
    ),
    (
        "access_page",
        "ReportService/GetAccessReport",
        "time_range { start { seconds: $start } end { seconds: $end } }
         group_by: ACCESS_GROUPING_ACTOR_SOURCE_IP page_size: 1",
        "next_page_token",
    ),
    (
        "export_cursor",
        "ReportService/ExportEvents",
        "time_range { start { seconds: $start } end { seconds: $end } }",
        "cursor|heartbeat.head_cursor",
    ),
];

/// What tenant A reads back before and after the matrix: (method, request).
const SNAPSHOT: &[(&str, &str)] = &[
    ("AdminService/GetTenant", ""),
    ("AdminService/ListApiKeys", "include_inactive: true"),
    ("AdminService/ListWebhookSources", ""),
    ("AdminService/ListRules", ""),
    ("AlertService/ListAlerts", "page_size: 100"),
    ("AlertService/GetAlert", r#"alert_id: "$alert""#),
    (
        "EnforcementService/ListDecisions",
        "include_inactive: true page_size: 100",
    ),
    ("EnforcementService/CheckAccess", r#"ip: "$banned_ip""#),
    ("IncidentService/ListIncidents", "page_size: 100"),
    ("IncidentService/GetIncident", r#"incident_id: "$incident""#),
    (
        "IncidentService/GetIncident",
        r#"incident_id: "$incident2""#,
    ),
    (
        "IngestService/QueryEvents",
        "time_range { start { seconds: $start } end { seconds: $end } } page_size: 1000",
    ),
    ("PlaybookService/ListPlaybooks", "page_size: 100"),
    (
        "PlaybookService/ListPlaybookRuns",
        "page_size: 100 statuses: RUN_STATUS_PENDING_APPROVAL",
    ),
    ("PlaybookService/GetPlaybookRun", r#"run_id: "$run""#),
    ("PlaybookService/GetNotificationSettings", ""),
];

/// The `picket.v1` descriptors the server serves for reflection.
fn pool() -> DescriptorPool {
    DescriptorPool::decode(picket::grpc::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

/// Every method of every `picket.v1` service, by `Service/Method`.
fn methods(pool: &DescriptorPool) -> BTreeMap<String, MethodDescriptor> {
    pool.services()
        .filter(|s| s.package_name() == "picket.v1")
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .map(|m| (format!("{}/{}", m.parent_service().name(), m.name()), m))
        .collect()
}

/// Fails naming every method without an entry and every entry without a method.
fn check_complete(methods: &BTreeMap<String, MethodDescriptor>) {
    let table: BTreeSet<&str> = MATRIX.iter().map(|e| e.method).collect();
    assert_eq!(table.len(), MATRIX.len(), "a method is in MATRIX twice");
    let missing: Vec<&str> = methods
        .keys()
        .map(String::as_str)
        .filter(|m| !table.contains(m))
        .collect();
    let stale: Vec<&str> = table
        .iter()
        .copied()
        .filter(|m| !methods.contains_key(*m))
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "MATRIX must hold exactly the RPCs of picket.v1: no authorization decision for {missing:?}; \
         entries for methods that do not exist: {stale:?}"
    );
}

/// `template` with every `$name` replaced by `vars[name]`; an unknown name panics.
fn fill(template: &str, vars: &BTreeMap<&'static str, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let name_len = rest[i + 1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - i - 1);
        let name = &rest[i + 1..i + 1 + name_len];
        let value = vars
            .get(name)
            .unwrap_or_else(|| panic!("template variable ${name} has no value: {template}"));
        out.push_str(value);
        rest = &rest[i + 1 + name_len..];
    }
    out.push_str(rest);
    out
}

/// `method`'s request from `template`, encoded.
fn encode(
    method: &MethodDescriptor,
    template: &str,
    vars: &BTreeMap<&'static str, String>,
) -> Vec<u8> {
    let text = fill(template, vars);
    DynamicMessage::parse_text_format(method.input(), &text)
        .unwrap_or_else(|e| panic!("{}: bad request template {text:?}: {e}", method.full_name()))
        .encode_to_vec()
}

/// Sends and receives messages as the bytes they are on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct Bytes;

impl tonic::codec::Codec for Bytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Bytes;
    type Decoder = Bytes;
    fn encoder(&mut self) -> Self::Encoder {
        Bytes
    }
    fn decoder(&mut self) -> Self::Decoder {
        Bytes
    }
}

impl tonic::codec::Encoder for Bytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Bytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Longest wait for a stream's first message (watch streams heartbeat every second).
const FIRST_MESSAGE: Duration = Duration::from_secs(10);

fn request<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    match key {
        Some(k) => with_key(msg, k),
        None => tonic::Request::new(msg),
    }
}

/// Calls `method` with `body` as `key` (none: no `x-api-key`): the answer
/// (a stream's first message; none if it ended or sent nothing within
/// `FIRST_MESSAGE`) or the status.
async fn call(
    channel: &Channel,
    method: &MethodDescriptor,
    body: Vec<u8>,
    key: Option<&str>,
) -> Result<Option<Vec<u8>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let path: http::uri::PathAndQuery =
        format!("/{}/{}", method.parent_service().full_name(), method.name())
            .parse()
            .unwrap();
    let mut stream = match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => {
            return grpc
                .unary(request(body, key), path, Bytes)
                .await
                .map(|r| Some(r.into_inner()));
        }
        (false, true) => grpc
            .server_streaming(request(body, key), path, Bytes)
            .await?
            .into_inner(),
        (true, _) => {
            // One message, then the end of the request stream.
            let messages = tokio_stream::iter(vec![body]);
            grpc.streaming(request(messages, key), path, Bytes)
                .await?
                .into_inner()
        }
    };
    match tokio::time::timeout(FIRST_MESSAGE, stream.message()).await {
        Ok(first) => first,
        Err(_) => Ok(None),
    }
}

/// A grpc-web call over HTTP/1.1: the grpc-status (from the headers of a
/// trailers-only answer, or the trailer frame in the body).
async fn call_grpc_web(app: &TestApp, method: &str, body: Vec<u8>, key: Option<&str>) -> i32 {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    let mut headers = vec![
        ("content-type", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
    ];
    if let Some(k) = key {
        headers.push(("x-api-key", k));
    }
    let path = format!("/picket.v1.{method}");
    let (status, headers, body) = http1(app.addr, "POST", &path, &headers, framed).await;
    assert_eq!(status, 200, "{method} over grpc-web: HTTP {status}");
    if let Some(s) = headers.get("grpc-status") {
        return s.to_str().unwrap().parse().unwrap();
    }
    let mut rest = &body[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        if rest[0] & 0x80 != 0 {
            let trailers = String::from_utf8_lossy(&rest[5..5 + len]).to_lowercase();
            for line in trailers.lines() {
                if let Some(code) = line.trim().strip_prefix("grpc-status:") {
                    return code.trim().parse().unwrap();
                }
            }
        }
        rest = &rest[5 + len..];
    }
    panic!("{method} over grpc-web: no grpc-status in {headers:?} {body:?}")
}

/// Tenant A's objects, keys and secrets, and tenant B's key.
struct Fixture {
    /// Template variables: A's ids, cursors and page tokens.
    vars: BTreeMap<&'static str, String>,
    /// A's key holding every scope.
    a_all: String,
    /// A's keys each lacking one scope.
    a_without: BTreeMap<i32, String>,
    /// A's key holding every scope, revoked.
    a_revoked: String,
    /// B's key holding every scope.
    b_all: String,
    /// Strings of A's that no answer to B may contain.
    a_secrets: Vec<String>,
    /// A's webhook source (name, secret) and B's secret.
    a_hook: (String, String),
    b_hook_secret: String,
}

const ALL: [pb::Scope; 4] = [
    pb::Scope::Ingest,
    pb::Scope::Read,
    pb::Scope::Respond,
    pb::Scope::Admin,
];

/// `X-Picket-Signature` for `body`, signed now with `secret`.
fn signature(secret: &str, body: &[u8]) -> String {
    let t = chrono::Utc::now().timestamp();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn webhook_body(ip: &str) -> Vec<u8> {
    serde_json::json!({
        "source": "guardduty",
        "type": "authentication.brute_force",
        "severity": "high",
        "entity": {"kind": "ip", "value": ip},
        "title": "Brute force from outside",
        "summary": "200 failed logins in 5 minutes",
        "raw": {},
    })
    .to_string()
    .into_bytes()
}

/// POSTs `body` to the webhook route of `source`; returns (status, body).
async fn post_webhook(
    app: &TestApp,
    source: &str,
    signature: Option<&str>,
    body: Vec<u8>,
) -> (u16, String) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = signature {
        headers.push(("x-picket-signature", s));
    }
    let path = format!("/v1/webhooks/{source}");
    let (status, _, body) = http1(app.addr, "POST", &path, &headers, body).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Text-format string escaping (for the rule's YAML).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The decoded answer of `method` to `template` as `key`, or the status.
async fn try_read_as(
    app: &TestApp,
    methods: &BTreeMap<String, MethodDescriptor>,
    vars: &BTreeMap<&'static str, String>,
    key: &str,
    method: &str,
    template: &str,
) -> Result<DynamicMessage, String> {
    let m = &methods[method];
    match call(&app.channel, m, encode(m, template, vars), Some(key)).await {
        Ok(Some(bytes)) => Ok(DynamicMessage::decode(m.output(), &bytes[..]).unwrap()),
        Ok(None) => Err("no answer".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// [`try_read_as`], which must answer.
async fn read_as(
    app: &TestApp,
    methods: &BTreeMap<String, MethodDescriptor>,
    vars: &BTreeMap<&'static str, String>,
    key: &str,
    method: &str,
    template: &str,
) -> DynamicMessage {
    try_read_as(app, methods, vars, key, method, template)
        .await
        .unwrap_or_else(|e| panic!("{method} {template}: {e}"))
}

async fn fixture(app: &TestApp, methods: &BTreeMap<String, MethodDescriptor>) -> Fixture {
    use crate::playbooks::{approved, create, incidents, playbook, start, step};
    let ch = &app.channel;
    let (a_tenant, a_all) = app.tenant_with_key("matrix-a", &ALL).await;
    let (_, b_all) = app.tenant_with_key("matrix-b", &ALL).await;
    let mut a_without = BTreeMap::new();
    for scope in ALL {
        let others: Vec<pb::Scope> = ALL.into_iter().filter(|s| *s != scope).collect();
        a_without.insert(scope as i32, app.key_for(&a_tenant, &others).await);
    }
    let a_revoked = app.key_for(&a_tenant, &ALL).await;
    app.admin()
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest {
                key_id: app.key_id(&a_revoked).await,
            },
            &a_all,
        ))
        .await
        .expect("revoke a key");
    let now = chrono::Utc::now().timestamp();
    let mut vars: BTreeMap<&'static str, String> = BTreeMap::new();
    vars.insert("tenant", a_tenant.clone());
    vars.insert("nobody", uuid::Uuid::now_v7().to_string());
    vars.insert("key", app.key_id(&a_all).await);
    vars.insert(
        "key_without_read",
        app.key_id(&a_without[&(pb::Scope::Read as i32)]).await,
    );
    vars.insert("start", (now - 86_400).to_string());
    vars.insert("end", (now + 3_600).to_string());
    vars.insert("banned_ip", "198.51.100.77".into());
    vars.insert(
        "event",
        format!(
            r#"occurred_at {{ seconds: {now} }} event_type: "user.login" idempotency_key: "matrix-new"
               actor: "mallory" action: "login" resource: "/auth/login" outcome: OUTCOME_FAILURE
               source_ip: "192.0.2.9""#
        ),
    );
    vars.insert(
        "steps",
        r#"steps { name: "note" action: ACTION_KIND_ADD_INCIDENT_NOTE requires_approval: true
                   params { key: "text" value: "checked {{entity.ip}}" } }"#
            .into(),
    );

    // Events of two actors from two addresses (two access report rows).
    let events = (0..4)
        .map(|i| {
            let actor = if i % 2 == 0 { "alice-a" } else { "bob-a" };
            let ip = if i % 2 == 0 {
                "203.0.113.77"
            } else {
                "203.0.113.78"
            };
            crate::ingest::login(&format!("matrix-a-{i}"), actor, ip, true)
        })
        .collect();
    app.ingest()
        .ingest(with_key(pb::IngestRequest { events }, &a_all))
        .await
        .expect("ingest A's events");

    // Webhook sources; two alerts of A's through its source.
    let hook = |tenant_key: String, name: &'static str| {
        let mut admin = app.admin();
        async move {
            admin
                .create_webhook_source(with_key(
                    pb::CreateWebhookSourceRequest {
                        tenant_id: String::new(),
                        name: name.into(),
                        allow_body_only_signature: false,
                    },
                    &tenant_key,
                ))
                .await
                .expect("create webhook source")
                .into_inner()
        }
    };
    let a_hook = hook(a_all.clone(), "matrix-a-hook").await;
    let b_hook = hook(b_all.clone(), "matrix-b-hook").await;
    let a_source = a_hook.source.unwrap();
    vars.insert("source", a_source.id.clone());
    let mut alert_ids = Vec::new();
    for ip in ["203.0.113.77", "203.0.113.78"] {
        let body = webhook_body(ip);
        let sig = signature(&a_hook.secret, &body);
        let (status, answer) = post_webhook(app, &a_source.name, Some(&sig), body).await;
        assert_eq!(status, 201, "{answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        alert_ids.push(answer["alert_id"].as_str().unwrap().to_owned());
    }
    vars.insert("alert", alert_ids[0].clone());
    vars.insert("alert2", alert_ids[1].clone());

    // Two incidents, the first holding the first alert.
    let mut inc = incidents(ch);
    let mut incident_ids = Vec::new();
    for (title, alerts) in [
        ("matrix-a-one", vec![alert_ids[0].clone()]),
        ("matrix-a-two", vec![]),
    ] {
        let created = inc
            .create_incident(with_key(
                pb::CreateIncidentRequest {
                    title: title.into(),
                    severity: pb::Severity::High as i32,
                    alert_ids: alerts,
                    entities: vec![pb::Entity {
                        kind: pb::EntityKind::Ip as i32,
                        value: "203.0.113.77".into(),
                    }],
                    ..Default::default()
                },
                &a_all,
            ))
            .await
            .expect("create incident")
            .into_inner();
        incident_ids.push(created.incident.unwrap().id);
    }
    vars.insert("incident", incident_ids[0].clone());
    vars.insert("incident2", incident_ids[1].clone());

    // Two playbooks; two runs of the first, waiting for approval.
    let note = || {
        approved(step(
            "note",
            pb::ActionKind::AddIncidentNote,
            &[("text", "checked {{entity.ip}}")],
        ))
    };
    let first = create(ch, &a_all, playbook("matrix-a-first", vec![note()])).await;
    create(ch, &a_all, playbook("matrix-a-second", vec![note()])).await;
    vars.insert("playbook", first.id.clone());
    let run = start(ch, &a_all, &first.id, &incident_ids[0])
        .await
        .unwrap();
    start(ch, &a_all, &first.id, &incident_ids[1])
        .await
        .unwrap();
    assert_eq!(run.status, pb::RunStatus::PendingApproval as i32, "{run:?}");
    vars.insert("run", run.id.clone());
    let b_body = webhook_body("192.0.2.50");
    let b_sig = signature(&b_hook.secret, &b_body);
    let (status, answer) = post_webhook(app, "matrix-b-hook", Some(&b_sig), b_body).await;
    assert_eq!(status, 201, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    vars.insert("b_alert", answer["alert_id"].as_str().unwrap().to_owned());
    vars.insert(
        "b_incident",
        crate::playbooks::incident(ch, &b_all, "matrix-b-one", "192.0.2.50", "").await,
    );
    let b_first = create(ch, &b_all, playbook("matrix-b-first", vec![note()])).await;
    vars.insert("b_playbook", b_first.id);
    vars.insert("digest", run.params_digest.clone());

    // Two decisions.
    let mut enforcement = pb::enforcement_service_client::EnforcementServiceClient::new(ch.clone());
    let mut decision_ids = Vec::new();
    for ip in ["198.51.100.77", "198.51.100.79"] {
        let d = enforcement
            .create_decision(with_key(
                pb::CreateDecisionRequest {
                    decision: Some(pb::NewDecision {
                        scope: pb::DecisionScope::Ip as i32,
                        value: ip.into(),
                        r#type: pb::DecisionType::Ban as i32,
                        duration_seconds: 86_400,
                        reason: "matrix".into(),
                        alert_id: alert_ids[0].clone(),
                        ..Default::default()
                    }),
                },
                &a_all,
            ))
            .await
            .expect("create decision")
            .into_inner();
        decision_ids.push(d.decision.unwrap().id);
    }
    vars.insert("decision", decision_ids[0].clone());

    // A rule.
    let yaml = crate::rules::db_drop_rule("matrix-a-rule");
    let rule = app
        .admin()
        .create_rule(with_key(
            pb::CreateRuleRequest {
                tenant_id: String::new(),
                sigma_yaml: yaml.clone(),
                enabled: true,
            },
            &a_all,
        ))
        .await
        .expect("create rule")
        .into_inner()
        .rule
        .unwrap();
    vars.insert("rule", rule.id.clone());
    vars.insert("sigma", escape(&yaml));

    // A's notification settings and secret.
    let settings = read_as(
        app,
        methods,
        &vars,
        &a_all,
        "PlaybookService/UpdateNotificationSettings",
        r#"url: "https://hooks.example.com/matrix-a""#,
    )
    .await;
    let mut notification_secret = field_text(&settings, "secret");
    if notification_secret.is_empty() {
        let rotated = read_as(
            app,
            methods,
            &vars,
            &a_all,
            "PlaybookService/RotateNotificationSecret",
            "",
        )
        .await;
        notification_secret = field_text(&rotated, "secret");
    }
    assert!(
        !notification_secret.is_empty(),
        "A has no notification secret"
    );

    // Cursors and page tokens from A's own calls (a stream's first message
    // that carries one: on Postgres a heartbeat sent before the feed has
    // read anything has no head cursor yet).
    app.db.feeds_settled().await;
    for (var, method, template, field) in TOKENS {
        let token = token_of(app, &methods[*method], &vars, &a_all, template, field).await;
        vars.insert(var, token);
    }

    let mut a_secrets: Vec<String> = [
        "tenant",
        "key",
        "source",
        "alert",
        "alert2",
        "incident",
        "incident2",
        "playbook",
        "run",
        "decision",
        "rule",
        "key_without_read",
    ]
    .iter()
    .map(|v| vars[v].clone())
    .collect();
    a_secrets.extend([
        decision_ids[1].clone(),
        a_hook.secret.clone(),
        notification_secret,
        a_all.clone(),
        "matrix-a".into(),
        "alice-a".into(),
        "bob-a".into(),
        "203.0.113.77".into(),
        "198.51.100.7".into(),
    ]);
    a_secrets.retain(|s| !s.is_empty());
    Fixture {
        vars,
        a_all,
        a_without,
        a_revoked,
        b_all,
        a_secrets,
        a_hook: (a_source.name, a_hook.secret),
        b_hook_secret: b_hook.secret,
    }
}

/// The first non-empty `field` (see [`field_text`]) in the answer of
/// `method` to `template` as `key`: a unary answer, or the first message
/// of a stream that carries one within `FIRST_MESSAGE`.
async fn token_of(
    app: &TestApp,
    method: &MethodDescriptor,
    vars: &BTreeMap<&'static str, String>,
    key: &str,
    template: &str,
    field: &str,
) -> String {
    let name = method.full_name();
    let body = encode(method, template, vars);
    if !method.is_server_streaming() {
        let answer = call(&app.channel, method, body, Some(key))
            .await
            .unwrap_or_else(|s| panic!("{name}: {s:?}"))
            .unwrap_or_else(|| panic!("{name}: no answer"));
        let answer = DynamicMessage::decode(method.output(), &answer[..]).unwrap();
        let token = field_text(&answer, field);
        assert!(!token.is_empty(), "{name} gave A no {field}: {answer}");
        return token;
    }
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.expect("channel ready");
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let mut stream = grpc
        .server_streaming(with_key(body, key), path.parse().unwrap(), Bytes)
        .await
        .unwrap_or_else(|s| panic!("{name}: {s:?}"))
        .into_inner();
    tokio::time::timeout(FIRST_MESSAGE, async {
        loop {
            let message = stream
                .message()
                .await
                .unwrap_or_else(|s| panic!("{name}: {s:?}"))
                .unwrap_or_else(|| panic!("{name} ended without a {field}"));
            let message = DynamicMessage::decode(method.output(), &message[..]).unwrap();
            let token = field_text(&message, field);
            if !token.is_empty() {
                return token;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} sent A no {field} within {FIRST_MESSAGE:?}"))
}

/// A's view of its own objects: (what was read, the answer). Answers are
/// compared as messages (map fields have no order).
async fn snapshot(
    app: &TestApp,
    methods: &BTreeMap<String, MethodDescriptor>,
    f: &Fixture,
) -> Vec<(String, Result<DynamicMessage, String>)> {
    let mut out = Vec::new();
    for (method, template) in SNAPSHOT {
        let m = try_read_as(app, methods, &f.vars, &f.a_all, method, template).await;
        out.push((format!("{method} {template}"), m));
    }
    // Tenants as the operator sees them (CreateTenant must have made none).
    let m = try_read_as(
        app,
        methods,
        &f.vars,
        OPERATOR_TOKEN,
        "AdminService/ListTenants",
        "page_size: 100",
    )
    .await;
    out.push(("AdminService/ListTenants".into(), m));
    out
}

/// The first non-empty string at one of the `|`-separated dotted `paths` of `msg`.
fn field_text(msg: &DynamicMessage, paths: &str) -> String {
    for path in paths.split('|') {
        let mut at = msg.clone();
        let mut parts = path.split('.').peekable();
        while let Some(name) = parts.next() {
            if !at.has_field_by_name(name) {
                break;
            }
            let value = at.get_field_by_name(name).unwrap().into_owned();
            if parts.peek().is_none() {
                match value.as_str() {
                    Some(s) if !s.is_empty() => return s.to_owned(),
                    _ => break,
                }
            }
            match value.as_message() {
                Some(m) => at = m.clone(),
                None => break,
            }
        }
    }
    String::new()
}

/// A forged key: A's real key id with another secret.
fn forged(key: &str) -> String {
    let mut k = key.to_owned();
    let last = k.pop().unwrap();
    k.push(if last == 'A' { 'B' } else { 'A' });
    k
}

/// Records a failure unless `got` is `want`.
fn check(
    failures: &mut Vec<String>,
    what: &str,
    method: &str,
    got: Code,
    want: Code,
    detail: String,
) {
    if got != want {
        failures.push(format!(
            "{method} {what}: expected {want:?}, got {got:?} {detail}"
        ));
    }
}

/// A read as text.
fn shown(r: &Result<DynamicMessage, String>) -> String {
    match r {
        Ok(m) => m.to_string(),
        Err(e) => e.clone(),
    }
}

/// An answer as text: the decoded message, or the status.
fn described(m: &MethodDescriptor, r: &Result<Option<Vec<u8>>, tonic::Status>) -> String {
    match r {
        Ok(Some(bytes)) => DynamicMessage::decode(m.output(), &bytes[..])
            .map(|d| format!("{{{d}}}"))
            .unwrap_or_else(|e| format!("undecodable answer ({e})")),
        Ok(None) => "(no message)".into(),
        Err(s) => format!("({}: {})", s.code(), s.message()),
    }
}

/// Records a failure for every string of A's in an answer to B.
fn leaks(
    failures: &mut Vec<String>,
    m: &MethodDescriptor,
    r: &Result<Option<Vec<u8>>, tonic::Status>,
    secrets: &[String],
    method: &str,
) {
    let Ok(Some(answer)) = r else { return };
    let text = DynamicMessage::decode(m.output(), &answer[..])
        .map(|d| d.to_string())
        .unwrap_or_else(|e| format!("undecodable answer {e}: {answer:?}"));
    for s in secrets {
        if text.contains(s.as_str()) {
            failures.push(format!(
                "{method} as another tenant: the answer holds A's {s:?}: {text}"
            ));
        }
    }
}

/// For a request B must get an answer to with nothing of A's in it: A's
/// own call must answer with something of A's, or B's empty answer would
/// prove nothing (a filter or token that matches nobody).
async fn control(
    failures: &mut Vec<String>,
    app: &TestApp,
    m: &MethodDescriptor,
    body: Vec<u8>,
    f: &Fixture,
    method: &str,
) {
    let r = call(&app.channel, m, body, Some(&f.a_all)).await;
    let text = described(m, &r);
    if r.is_err() || !f.a_secrets.iter().any(|s| text.contains(s.as_str())) {
        failures.push(format!(
            "{method}: A's own call answers nothing of A's, so B's empty answer proves nothing: {text}"
        ));
    }
}

fn code_of(r: &Result<Option<Vec<u8>>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// How many calls of each case the matrix made.
#[derive(Debug, Default)]
struct Counts {
    methods: usize,
    no_key: usize,
    forged_key: usize,
    revoked_key: usize,
    operator: usize,
    wrong_scope: usize,
    cross_tenant: usize,
    cross_tenant_with_ids: usize,
    mixed: usize,
    controls: usize,
    grpc_web: usize,
}

async fn every_rpc_refuses_the_wrong_caller(backend: Backend) {
    let pool = pool();
    let methods = methods(&pool);
    check_complete(&methods);
    let app = common::spawn_app(backend).await;
    let f = fixture(&app, &methods).await;
    let before = snapshot(&app, &methods, &f).await;
    for (what, read) in &before {
        assert!(read.is_ok(), "A cannot read its own {what}: {read:?}");
    }
    let forged_key = forged(&f.a_all);
    let mut failures: Vec<String> = Vec::new();
    let mut counts = Counts::default();
    for entry in MATRIX {
        let m = &methods[entry.method];
        let body = encode(m, entry.request, &f.vars);
        counts.methods += 1;

        // 1. No key, a forged key, a revoked key.
        let r = call(&app.channel, m, body.clone(), None).await;
        check(
            &mut failures,
            "without a key",
            entry.method,
            code_of(&r),
            Code::Unauthenticated,
            described(m, &r),
        );
        counts.no_key += 1;
        let r = call(&app.channel, m, body.clone(), Some(&forged_key)).await;
        check(
            &mut failures,
            "with a forged key",
            entry.method,
            code_of(&r),
            Code::Unauthenticated,
            described(m, &r),
        );
        counts.forged_key += 1;
        let r = call(&app.channel, m, body.clone(), Some(&f.a_revoked)).await;
        check(
            &mut failures,
            "with a revoked key",
            entry.method,
            code_of(&r),
            Code::Unauthenticated,
            described(m, &r),
        );
        counts.revoked_key += 1;

        // 2. The same tenant without the scope.
        let (key, want) = match entry.access {
            // Any key will do: the one with the fewest scopes is still enough.
            Authenticated => (&f.a_without[&(pb::Scope::Admin as i32)], Code::Ok),
            Access::Scope(s) => (&f.a_without[&(s as i32)], Code::PermissionDenied),
            Operator => (&f.a_all, Code::PermissionDenied),
        };
        let r = call(&app.channel, m, body.clone(), Some(key)).await;
        check(
            &mut failures,
            "without its scope",
            entry.method,
            code_of(&r),
            want,
            described(m, &r),
        );
        counts.wrong_scope += 1;

        // The operator token has every scope and no tenant: a tenant's data
        // (every service but AdminService) needs a tenant key.
        if m.parent_service().name() != "AdminService" {
            let r = call(&app.channel, m, body.clone(), Some(OPERATOR_TOKEN)).await;
            check(
                &mut failures,
                "with the operator token",
                entry.method,
                code_of(&r),
                Code::PermissionDenied,
                described(m, &r),
            );
            counts.operator += 1;
        }

        // The same two over grpc-web (which carries no client streams).
        if !m.is_client_streaming() {
            let got = call_grpc_web(&app, entry.method, body.clone(), None).await;
            check(
                &mut failures,
                "over grpc-web without a key",
                entry.method,
                Code::from(got),
                Code::Unauthenticated,
                String::new(),
            );
            let got = call_grpc_web(&app, entry.method, body.clone(), Some(key)).await;
            check(
                &mut failures,
                "over grpc-web without its scope",
                entry.method,
                Code::from(got),
                want,
                String::new(),
            );
            counts.grpc_web += 2;
        }

        // 3. Tenant B with A's ids, cursors and page tokens.
        let want = match entry.cross {
            Cross::None => continue,
            Own | Empty => Code::Ok,
            NotFound => Code::NotFound,
            Denied => Code::PermissionDenied,
            Invalid => Code::InvalidArgument,
        };
        let r = call(&app.channel, m, body.clone(), Some(&f.b_all)).await;
        check(
            &mut failures,
            "as another tenant",
            entry.method,
            code_of(&r),
            want,
            described(m, &r),
        );
        counts.cross_tenant += 1;
        if entry.cross != Own {
            counts.cross_tenant_with_ids += 1;
        }
        leaks(&mut failures, m, &r, &f.a_secrets, entry.method);
        if entry.cross == Empty {
            control(&mut failures, &app, m, body.clone(), &f, entry.method).await;
            counts.controls += 1;
        }
    }

    // B's own objects beside one of A's.
    for (method, cross, template) in MIXED {
        let m = &methods[*method];
        let body = encode(m, template, &f.vars);
        let r = call(&app.channel, m, body.clone(), Some(&f.b_all)).await;
        let want = match cross {
            Own | Empty => Code::Ok,
            NotFound => Code::NotFound,
            Denied => Code::PermissionDenied,
            Invalid => Code::InvalidArgument,
            Cross::None => unreachable!("a MIXED row is a call"),
        };
        let what = format!("as another tenant, beside its own ids ({template})");
        check(
            &mut failures,
            &what,
            method,
            code_of(&r),
            want,
            described(m, &r),
        );
        leaks(&mut failures, m, &r, &f.a_secrets, method);
        if *cross == Empty {
            control(&mut failures, &app, m, body, &f, method).await;
            counts.controls += 1;
        }
        counts.mixed += 1;
    }

    // The webhook route: no signature, a wrong one, another source's.
    let (a_name, a_secret) = &f.a_hook;
    let body = webhook_body("192.0.2.77");
    let wrong = signature("whsec_wrong", &body);
    let other = signature(&f.b_hook_secret, &body);
    for (what, sig) in [
        ("unsigned", None),
        ("badly signed", Some(wrong.as_str())),
        ("signed with another source's secret", Some(other.as_str())),
    ] {
        let (status, answer) = post_webhook(&app, a_name, sig, body.clone()).await;
        if status != 401 {
            failures.push(format!(
                "webhook {what}: expected 401, got {status} {answer}"
            ));
        }
    }
    // Signed over another body: the signature does not carry over.
    let stale = signature(a_secret, b"{}");
    let (status, answer) = post_webhook(&app, a_name, Some(&stale), body.clone()).await;
    if status != 401 {
        failures.push(format!(
            "webhook signed over another body: expected 401, got {status} {answer}"
        ));
    }

    // Nothing of A's changed.
    let after = snapshot(&app, &methods, &f).await;
    for ((what, b), (_, a)) in before.iter().zip(&after) {
        if b != a {
            failures.push(format!(
                "A's state changed ({what}):\n  before {}\n  after  {}",
                shown(b),
                shown(a)
            ));
        }
    }
    // B has only its own alert: nothing came through A's webhook route.
    let b_alerts = read_as(
        &app,
        &methods,
        &f.vars,
        &f.b_all,
        "AlertService/ListAlerts",
        "",
    )
    .await;
    let listed = b_alerts.get_field_by_name("alerts").unwrap();
    let ids: Vec<String> = listed
        .as_list()
        .unwrap()
        .iter()
        .map(|a| field_text(a.as_message().unwrap(), "id"))
        .collect();
    if ids != [f.vars["b_alert"].clone()] {
        failures.push(format!("B has other alerts than its own one: {b_alerts}"));
    }

    // An alert of B's about an address A's events come from: its context
    // holds B's events only (A's context about the same address holds A's).
    let body = webhook_body("203.0.113.78");
    let sig = signature(&f.b_hook_secret, &body);
    let (status, answer) = post_webhook(&app, "matrix-b-hook", Some(&sig), body).await;
    assert_eq!(status, 201, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let b_shared = answer["alert_id"].as_str().unwrap();
    let m = &methods["AlertService/GetAlertContext"];
    let mut vars = f.vars.clone();
    vars.insert("shared", b_shared.to_owned());
    let template = r#"alert_id: "$shared" window_seconds: 86400"#;
    let r = call(&app.channel, m, encode(m, template, &vars), Some(&f.b_all)).await;
    check(
        &mut failures,
        "about A's address, as another tenant",
        "AlertService/GetAlertContext",
        code_of(&r),
        Code::Ok,
        described(m, &r),
    );
    leaks(
        &mut failures,
        m,
        &r,
        &f.a_secrets,
        "AlertService/GetAlertContext",
    );
    let template = r#"alert_id: "$alert2" window_seconds: 86400"#;
    let mine = call(&app.channel, m, encode(m, template, &vars), Some(&f.a_all)).await;
    if !described(m, &mine).contains("bob-a") {
        failures.push(
            "AlertService/GetAlertContext: A's context about its address lacks its events".into(),
        );
    }

    assert!(
        failures.is_empty(),
        "{} authorization failures ({counts:?}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(counts.methods, methods.len());
    eprintln!("authorization matrix: {counts:?}");
}

/// The table matches the descriptor set (fast: no server).
#[test]
fn matrix_names_every_rpc() {
    check_complete(&methods(&pool()));
}

crate::both_backends!(every_rpc_refuses_the_wrong_caller);
