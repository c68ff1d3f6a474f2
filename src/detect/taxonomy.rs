//! How a [`NewEvent`] is exposed to Sigma rules: the logsource (`product:
//! picket` plus a category derived from the event type and OCSF class) and the
//! field names rules may use, with aliases so community rules written against
//! common Sigma/ECS names still resolve. `rules/README.md` documents the same
//! table for rule authors.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use rsigma_eval::{Event, EventValue, JsonEvent};
use serde_json::{Map, Value};

use crate::domain::Severity;
use crate::domain::event::{NewEvent, Outcome, ocsf};

/// The logsource `product` every Picket event carries.
pub const PRODUCT: &str = "picket";

/// Logsource categories, in the order `rules/README.md` lists them.
pub const CATEGORIES: &[&str] = &[
    "authentication",
    "http",
    "api",
    "network",
    "vpn",
    "firewall",
    "database",
    "account",
    "tenant",
    "config",
    "quota",
    "other",
];

/// Canonical field names. Rules may use these or any alias in [`ALIASES`];
/// `Attributes.<key>` reads a free-form attribute.
pub const FIELDS: &[&str] = &[
    "EventId",
    "EventType",
    "Category",
    "Actor",
    "Action",
    "Resource",
    "Outcome",
    "Severity",
    "SourceIp",
    "DestinationIp",
    "SourceSystem",
    "Service",
    "Environment",
    "OcsfClassUid",
    "OcsfCategoryUid",
    "Http.Method",
    "Http.Path",
    "Http.Route",
    "Http.StatusCode",
    "Http.LatencyMs",
    "Http.BytesIn",
    "Http.BytesOut",
    "Http.UserAgent",
    "Auth.Method",
    "Auth.MfaUsed",
    "Auth.MfaMethod",
    "Auth.FailureReason",
    "Auth.SessionId",
    "Network.SourcePort",
    "Network.DestinationPort",
    "Network.Protocol",
    "Network.BytesSent",
    "Network.BytesReceived",
    "Network.Device",
    "Network.RuleId",
    "Database.System",
    "Database.Name",
    "Database.User",
    "Database.Operation",
    "Database.Rows",
    "Change.ObjectType",
    "Change.ObjectId",
    "Change.OldValue",
    "Change.NewValue",
    "Change.Privilege",
    "Change.TargetActor",
    "Quota.LimitName",
    "Quota.Limit",
    "Quota.Observed",
    "Quota.Throttled",
];

/// Aliases (compared after [`normalize`]) and the canonical field they read.
/// Canonical names also match case-insensitively and without `.`/`_`/`-`, so
/// `http.method`, `http_method` and `HttpMethod` all read `Http.Method`.
pub const ALIASES: &[(&str, &str)] = &[
    ("src_ip", "SourceIp"),
    ("src", "SourceIp"),
    ("client_ip", "SourceIp"),
    ("c-ip", "SourceIp"),
    ("ip_address", "SourceIp"),
    ("source.address", "SourceIp"),
    ("IpAddress", "SourceIp"),
    ("dst_ip", "DestinationIp"),
    ("dst", "DestinationIp"),
    ("dest_ip", "DestinationIp"),
    ("destination.address", "DestinationIp"),
    ("User", "Actor"),
    ("user.name", "Actor"),
    ("SubjectUserName", "Actor"),
    ("principal", "Actor"),
    ("TargetUserName", "Change.TargetActor"),
    ("event.action", "Action"),
    ("event.outcome", "Outcome"),
    ("event.severity", "Severity"),
    ("event.id", "EventId"),
    ("cs-method", "Http.Method"),
    ("http.request.method", "Http.Method"),
    ("cs-uri-stem", "Http.Path"),
    ("c-uri", "Http.Path"),
    ("url.path", "Http.Path"),
    ("sc-status", "Http.StatusCode"),
    ("http.response.status_code", "Http.StatusCode"),
    ("sc-bytes", "Http.BytesOut"),
    ("http.response.bytes", "Http.BytesOut"),
    ("cs-bytes", "Http.BytesIn"),
    ("http.request.bytes", "Http.BytesIn"),
    ("cs-user-agent", "Http.UserAgent"),
    ("user_agent.original", "Http.UserAgent"),
    ("dst_port", "Network.DestinationPort"),
    ("DestinationPort", "Network.DestinationPort"),
    ("destination.port", "Network.DestinationPort"),
    ("src_port", "Network.SourcePort"),
    ("SourcePort", "Network.SourcePort"),
    ("source.port", "Network.SourcePort"),
    ("service.name", "Service"),
    ("env", "Environment"),
];

/// Lower-cases and drops `.`, `_` and `-`, the comparison form of field names.
pub fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '.' | '_' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Exact canonical names, and normalized names and aliases → canonical name.
type FieldLookup = (
    HashMap<&'static str, &'static str>,
    HashMap<String, &'static str>,
);

/// The canonical field a rule's field name reads, or `None` if it names no
/// known field (then it is looked up as an attribute).
pub fn canonical_field(name: &str) -> Option<&'static str> {
    static LOOKUP: OnceLock<FieldLookup> = OnceLock::new();
    let (exact, normalized) = LOOKUP.get_or_init(|| {
        let exact = FIELDS.iter().map(|f| (*f, *f)).collect();
        let mut normalized: HashMap<String, &'static str> = ALIASES
            .iter()
            .map(|(alias, canonical)| (normalize(alias), *canonical))
            .collect();
        // Canonical names win over aliases that normalize the same way.
        normalized.extend(FIELDS.iter().map(|f| (normalize(f), *f)));
        (exact, normalized)
    });
    if let Some(c) = exact.get(name) {
        return Some(c);
    }
    normalized.get(&normalize(name)).copied()
}

/// Whether a rule may name this field: a canonical field, an alias, or an
/// attribute (`Attributes.<key>`).
pub fn is_known_field(name: &str) -> bool {
    canonical_field(name).is_some() || attribute_key(name).is_some()
}

/// The attribute key of an `Attributes.<key>` field name.
pub fn attribute_key(name: &str) -> Option<&str> {
    name.strip_prefix("Attributes.")
        .or_else(|| name.strip_prefix("attributes."))
        .filter(|k| !k.is_empty())
}

/// The logsource category of an event, from its OCSF class and the first
/// segment of its type (documented in `rules/README.md`).
pub fn category_of(e: &NewEvent) -> &'static str {
    let head = e.event_type.split(['.', '_']).next().unwrap_or("");
    match e.ocsf_class_uid {
        ocsf::AUTHENTICATION => "authentication",
        ocsf::ACCOUNT_CHANGE | ocsf::USER_ACCESS_MANAGEMENT => "account",
        ocsf::ENTITY_MANAGEMENT => match head {
            "firewall" => "firewall",
            "tenant" => "tenant",
            _ => "config",
        },
        ocsf::NETWORK_ACTIVITY => match head {
            "vpn" => "vpn",
            "firewall" => "firewall",
            _ => "network",
        },
        ocsf::HTTP_ACTIVITY => "http",
        ocsf::API_ACTIVITY => {
            if matches!(head, "quota" | "rate" | "ratelimit") || e.details.quota.is_some() {
                "quota"
            } else {
                "api"
            }
        }
        ocsf::DATASTORE_ACTIVITY => "database",
        _ => "other",
    }
}

/// Text form of an outcome as rules see it.
pub fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Success => "success",
        Outcome::Failure => "failure",
        Outcome::Unknown => "unknown",
    }
}

/// Text form of a severity as rules see it.
pub fn severity_str(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Low => "low",
        Severity::Medium => "medium",
        Severity::High => "high",
        Severity::Critical => "critical",
    }
}

/// An event as Sigma rules see it: a flat document of canonical fields,
/// read through the alias table.
///
/// Field lookups read the event in place: most events match no rule, and the
/// engine asks each of them only for a few fields (its logsource, the fields
/// its rules index), so building the whole document for every event (about
/// 25 map entries, each allocated) was most of evaluation's cost. The
/// document is built on first need only (keyword search, `to_json`, which
/// correlations call for their evidence references) and is the same as
/// before, so rules see exactly the same values either way.
pub struct PicketEvent<'a> {
    /// The event.
    e: &'a NewEvent,
    /// Its logsource category.
    category: &'static str,
    /// Its id as text.
    id: String,
    /// Source and destination addresses as text.
    source_ip: Option<String>,
    destination_ip: Option<String>,
    /// The flat document (`Http.Method` is one key, not a nested object),
    /// built on first need.
    doc: std::cell::OnceCell<JsonEvent<'static>>,
}

impl<'a> PicketEvent<'a> {
    /// The event as rules see it. Empty strings are absent, so `Field: null`
    /// and missing group-by values behave as in Sigma.
    pub fn new(e: &'a NewEvent) -> Self {
        Self {
            e,
            category: category_of(e),
            id: e.id.to_string(),
            source_ip: e.source_ip.map(|ip| ip.to_string()),
            destination_ip: e.destination_ip.map(|ip| ip.to_string()),
            doc: std::cell::OnceCell::new(),
        }
    }

    /// The flat document.
    fn doc(&self) -> &JsonEvent<'static> {
        self.doc.get_or_init(|| JsonEvent::owned(self.document()))
    }

    /// Builds the flat document.
    fn document(&self) -> Value {
        let e = self.e;
        let mut m = Map::new();
        // Logsource dimensions read by the engine's logsource pruning and the
        // id read into correlation evidence references.
        m.insert("product".into(), PRODUCT.into());
        m.insert("category".into(), self.category.into());
        m.insert("id".into(), self.id.clone().into());
        m.insert("EventId".into(), self.id.clone().into());
        m.insert("Category".into(), self.category.into());
        put_str(&mut m, "EventType", &e.event_type);
        put_str(&mut m, "Actor", &e.actor);
        put_str(&mut m, "Action", &e.action);
        put_str(&mut m, "Resource", &e.resource);
        m.insert("Outcome".into(), outcome_str(e.outcome).into());
        m.insert("Severity".into(), severity_str(e.severity).into());
        if let Some(ip) = &self.source_ip {
            m.insert("SourceIp".into(), ip.clone().into());
        }
        if let Some(ip) = &self.destination_ip {
            m.insert("DestinationIp".into(), ip.clone().into());
        }
        put_str(&mut m, "SourceSystem", &e.source_system);
        put_str(&mut m, "Service", &e.service);
        put_str(&mut m, "Environment", &e.environment);
        m.insert("OcsfClassUid".into(), e.ocsf_class_uid.into());
        m.insert("OcsfCategoryUid".into(), e.ocsf_category_uid.into());
        let d = &e.details;
        if let Some(h) = &d.http {
            put_str(&mut m, "Http.Method", &h.method);
            put_str(&mut m, "Http.Path", &h.path);
            put_str(&mut m, "Http.Route", &h.route);
            m.insert("Http.StatusCode".into(), h.status_code.into());
            put_f64(&mut m, "Http.LatencyMs", h.latency_ms);
            m.insert("Http.BytesIn".into(), h.bytes_in.into());
            m.insert("Http.BytesOut".into(), h.bytes_out.into());
            put_str(&mut m, "Http.UserAgent", &h.user_agent);
        }
        if let Some(a) = &d.auth {
            put_str(&mut m, "Auth.Method", &a.method);
            m.insert("Auth.MfaUsed".into(), a.mfa_used.into());
            put_str(&mut m, "Auth.MfaMethod", &a.mfa_method);
            put_str(&mut m, "Auth.FailureReason", &a.failure_reason);
            put_str(&mut m, "Auth.SessionId", &a.session_id);
        }
        if let Some(n) = &d.network {
            m.insert("Network.SourcePort".into(), n.source_port.into());
            m.insert("Network.DestinationPort".into(), n.destination_port.into());
            put_str(&mut m, "Network.Protocol", &n.protocol);
            m.insert("Network.BytesSent".into(), n.bytes_sent.into());
            m.insert("Network.BytesReceived".into(), n.bytes_received.into());
            put_str(&mut m, "Network.Device", &n.device);
            put_str(&mut m, "Network.RuleId", &n.rule_id);
        }
        if let Some(db) = &d.database {
            put_str(&mut m, "Database.System", &db.system);
            put_str(&mut m, "Database.Name", &db.database);
            put_str(&mut m, "Database.User", &db.db_user);
            put_str(&mut m, "Database.Operation", &db.operation);
            m.insert("Database.Rows".into(), db.rows.into());
        }
        if let Some(c) = &d.change {
            put_str(&mut m, "Change.ObjectType", &c.object_type);
            put_str(&mut m, "Change.ObjectId", &c.object_id);
            put_str(&mut m, "Change.OldValue", &c.old_value);
            put_str(&mut m, "Change.NewValue", &c.new_value);
            put_str(&mut m, "Change.Privilege", &c.privilege);
            put_str(&mut m, "Change.TargetActor", &c.target_actor);
        }
        if let Some(q) = &d.quota {
            put_str(&mut m, "Quota.LimitName", &q.limit_name);
            put_f64(&mut m, "Quota.Limit", q.limit);
            put_f64(&mut m, "Quota.Observed", q.observed);
            m.insert("Quota.Throttled".into(), q.throttled.into());
        }
        for (k, v) in &d.attributes {
            m.insert(format!("Attributes.{k}"), v.clone().into());
        }
        Value::Object(m)
    }

    /// The value the document holds under `key`, read from the event (the
    /// same value and type the document would give).
    fn field(&self, key: &str) -> Option<EventValue<'_>> {
        let e = self.e;
        let d = &e.details;
        let s = |v: &'a str| (!v.is_empty()).then_some(EventValue::Str(Cow::Borrowed(v)));
        let int = |v: u64| Some(number(v));
        let float = |v: f64| v.is_finite().then_some(EventValue::Float(v));
        match key {
            "product" => Some(EventValue::Str(Cow::Borrowed(PRODUCT))),
            "category" | "Category" => Some(EventValue::Str(Cow::Borrowed(self.category))),
            "id" | "EventId" => Some(EventValue::Str(Cow::Borrowed(&self.id))),
            "EventType" => s(&e.event_type),
            "Actor" => s(&e.actor),
            "Action" => s(&e.action),
            "Resource" => s(&e.resource),
            "Outcome" => Some(EventValue::Str(Cow::Borrowed(outcome_str(e.outcome)))),
            "Severity" => Some(EventValue::Str(Cow::Borrowed(severity_str(e.severity)))),
            "SourceIp" => self
                .source_ip
                .as_deref()
                .map(|v| EventValue::Str(Cow::Borrowed(v))),
            "DestinationIp" => self
                .destination_ip
                .as_deref()
                .map(|v| EventValue::Str(Cow::Borrowed(v))),
            "SourceSystem" => s(&e.source_system),
            "Service" => s(&e.service),
            "Environment" => s(&e.environment),
            "OcsfClassUid" => int(e.ocsf_class_uid.into()),
            "OcsfCategoryUid" => int(e.ocsf_category_uid.into()),
            _ => {
                if let Some(rest) = key.strip_prefix("Http.") {
                    let h = d.http.as_ref()?;
                    return match rest {
                        "Method" => s(&h.method),
                        "Path" => s(&h.path),
                        "Route" => s(&h.route),
                        "StatusCode" => int(h.status_code.into()),
                        "LatencyMs" => float(h.latency_ms),
                        "BytesIn" => int(h.bytes_in),
                        "BytesOut" => int(h.bytes_out),
                        "UserAgent" => s(&h.user_agent),
                        _ => None,
                    };
                }
                if let Some(rest) = key.strip_prefix("Auth.") {
                    let a = d.auth.as_ref()?;
                    return match rest {
                        "Method" => s(&a.method),
                        "MfaUsed" => Some(EventValue::Bool(a.mfa_used)),
                        "MfaMethod" => s(&a.mfa_method),
                        "FailureReason" => s(&a.failure_reason),
                        "SessionId" => s(&a.session_id),
                        _ => None,
                    };
                }
                if let Some(rest) = key.strip_prefix("Network.") {
                    let n = d.network.as_ref()?;
                    return match rest {
                        "SourcePort" => int(n.source_port.into()),
                        "DestinationPort" => int(n.destination_port.into()),
                        "Protocol" => s(&n.protocol),
                        "BytesSent" => int(n.bytes_sent),
                        "BytesReceived" => int(n.bytes_received),
                        "Device" => s(&n.device),
                        "RuleId" => s(&n.rule_id),
                        _ => None,
                    };
                }
                if let Some(rest) = key.strip_prefix("Database.") {
                    let db = d.database.as_ref()?;
                    return match rest {
                        "System" => s(&db.system),
                        "Name" => s(&db.database),
                        "User" => s(&db.db_user),
                        "Operation" => s(&db.operation),
                        "Rows" => int(db.rows),
                        _ => None,
                    };
                }
                if let Some(rest) = key.strip_prefix("Change.") {
                    let c = d.change.as_ref()?;
                    return match rest {
                        "ObjectType" => s(&c.object_type),
                        "ObjectId" => s(&c.object_id),
                        "OldValue" => s(&c.old_value),
                        "NewValue" => s(&c.new_value),
                        "Privilege" => s(&c.privilege),
                        "TargetActor" => s(&c.target_actor),
                        _ => None,
                    };
                }
                if let Some(rest) = key.strip_prefix("Quota.") {
                    let q = d.quota.as_ref()?;
                    return match rest {
                        "LimitName" => s(&q.limit_name),
                        "Limit" => float(q.limit),
                        "Observed" => float(q.observed),
                        "Throttled" => Some(EventValue::Bool(q.throttled)),
                        _ => None,
                    };
                }
                if let Some(k) = key.strip_prefix("Attributes.") {
                    // Attributes keep empty values (the document does too).
                    return d
                        .attributes
                        .get(k)
                        .map(|v| EventValue::Str(Cow::Borrowed(v.as_str())));
                }
                None
            }
        }
    }

    /// The name under which `path` is stored in the flat document.
    fn key<'p>(&self, path: &'p str) -> Cow<'p, str> {
        // The logsource dimensions first: the engine asks every event for
        // them, and only `category` has a canonical twin (`Category`, the
        // same value), so this order reads the same values without
        // normalizing the name.
        if matches!(path, "product" | "category" | "id") {
            return Cow::Borrowed(path);
        }
        if let Some(canonical) = canonical_field(path) {
            return Cow::Borrowed(canonical);
        }
        if let Some(k) = attribute_key(path) {
            return Cow::Owned(format!("Attributes.{k}"));
        }
        // An unknown name falls back to an attribute of that exact name, so
        // rules can match webhook fields kept as attributes.
        Cow::Owned(format!("Attributes.{path}"))
    }
}

/// An unsigned count as the document's JSON number reads back: an integer,
/// or beyond `i64` a float.
fn number(v: u64) -> EventValue<'static> {
    match i64::try_from(v) {
        Ok(i) => EventValue::Int(i),
        Err(_) => EventValue::Float(v as f64),
    }
}

fn put_str(m: &mut Map<String, Value>, k: &str, v: &str) {
    if !v.is_empty() {
        m.insert(k.to_string(), v.into());
    }
}

fn put_f64(m: &mut Map<String, Value>, k: &str, v: f64) {
    if let Some(n) = serde_json::Number::from_f64(v) {
        m.insert(k.to_string(), Value::Number(n));
    }
}

impl Event for PicketEvent<'_> {
    fn get_field(&self, path: &str) -> Option<EventValue<'_>> {
        let key = self.key(path);
        self.field(&key)
    }

    fn any_string_value(&self, pred: &dyn Fn(&str) -> bool) -> bool {
        self.doc().any_string_value(pred)
    }

    fn all_string_values(&self) -> Vec<Cow<'_, str>> {
        self.doc().all_string_values()
    }

    fn visit_string_values(&self, visit: &mut dyn FnMut(&str)) {
        self.doc().visit_string_values(visit)
    }

    fn to_json(&self) -> Value {
        self.doc().to_json()
    }
    // `top_level_keys` stays `None`: aliases mean a rule's field names are
    // not the document's keys, so the engine must probe every field.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::testing::event;

    #[test]
    fn aliases_and_canonical_names_resolve() {
        assert_eq!(canonical_field("SourceIp"), Some("SourceIp"));
        assert_eq!(canonical_field("src_ip"), Some("SourceIp"));
        assert_eq!(canonical_field("source.ip"), Some("SourceIp"));
        assert_eq!(canonical_field("User"), Some("Actor"));
        assert_eq!(canonical_field("http.method"), Some("Http.Method"));
        assert_eq!(canonical_field("HTTP_STATUSCODE"), Some("Http.StatusCode"));
        assert_eq!(canonical_field("Nope"), None);
        assert!(is_known_field("Attributes.k8s.pod"));
        assert!(!is_known_field("Attributes."));
    }

    /// Fields are read from the event in place; every name reads back the
    /// same value and type as from the flat document the engine saw before
    /// (and still gets for keyword search and `to_json`).
    #[test]
    fn fields_read_in_place_equal_the_flat_document() {
        use crate::domain::event::{
            AuthDetails, ChangeDetails, DatabaseDetails, HttpDetails, NetworkDetails, QuotaDetails,
        };
        let mut full = event("user.login");
        full.actor = "alice".into();
        full.action = "login".into();
        full.resource = "/auth".into();
        full.outcome = Outcome::Failure;
        full.severity = Severity::High;
        full.source_ip = Some("192.0.2.7".parse().unwrap());
        full.destination_ip = Some("2001:db8::1".parse().unwrap());
        full.source_system = "idp".into();
        full.service = "accounts".into();
        full.environment = "production".into();
        full.details.http = Some(HttpDetails {
            method: "GET".into(),
            path: "/x".into(),
            status_code: 404,
            latency_ms: 12.5,
            bytes_in: 0,
            bytes_out: u64::MAX,
            user_agent: String::new(),
            route: "/x".into(),
        });
        full.details.auth = Some(AuthDetails {
            method: "password".into(),
            mfa_used: true,
            failure_reason: "bad_password".into(),
            ..Default::default()
        });
        full.details.network = Some(NetworkDetails {
            source_port: 5000,
            destination_port: 443,
            protocol: "tcp".into(),
            bytes_sent: 7,
            ..Default::default()
        });
        full.details.database = Some(DatabaseDetails {
            system: "postgres".into(),
            rows: 3,
            ..Default::default()
        });
        full.details.change = Some(ChangeDetails {
            privilege: "admin".into(),
            target_actor: "bob".into(),
            ..Default::default()
        });
        full.details.quota = Some(QuotaDetails {
            limit_name: "rps".into(),
            limit: f64::NAN,
            observed: 3.0,
            throttled: true,
        });
        full.details
            .attributes
            .insert("k8s.pod".into(), "web-1".into());
        full.details
            .attributes
            .insert("empty".into(), String::new());
        let mut names: Vec<&str> = FIELDS.to_vec();
        names.extend(ALIASES.iter().map(|(a, _)| *a));
        names.extend([
            "product",
            "category",
            "id",
            "Attributes.k8s.pod",
            "k8s.pod",
            "Attributes.empty",
            "Attributes.missing",
            "nope",
            "Http.Nope",
            "Http",
        ]);
        for e in [full, event("http_request"), event("tenant.delete")] {
            let pe = PicketEvent::new(&e);
            let doc = JsonEvent::owned(pe.document());
            for name in &names {
                let key = pe.key(name);
                assert_eq!(pe.get_field(name), doc.get_field(&key), "{name}");
            }
            assert_eq!(pe.to_json(), pe.document());
        }
    }

    #[test]
    fn events_are_flattened_with_categories() {
        let mut e = event("user.login");
        e.actor = "alice".into();
        e.details
            .attributes
            .insert("k8s.pod".into(), "web-1".into());
        let pe = PicketEvent::new(&e);
        let s = |f: &str| {
            pe.get_field(f)
                .and_then(|v| v.as_str().map(|s| s.into_owned()))
        };
        assert_eq!(s("User").as_deref(), Some("alice"));
        assert_eq!(s("category").as_deref(), Some("authentication"));
        assert_eq!(s("Attributes.k8s.pod").as_deref(), Some("web-1"));
        assert_eq!(s("k8s.pod").as_deref(), Some("web-1"));
        assert_eq!(s("Resource"), None, "empty strings are absent");
        for (t, cat) in [
            ("vpn.connect", "vpn"),
            ("firewall.rule_change", "firewall"),
            ("tenant.delete", "tenant"),
            ("config.update", "config"),
            ("role.grant", "account"),
            ("quota.exceeded", "quota"),
            ("api.call", "api"),
            ("http_request", "http"),
            ("db.query", "database"),
            ("netflow.record", "network"),
            ("custom", "other"),
        ] {
            assert_eq!(category_of(&event(t)), cat, "{t}");
        }
    }
}
