//! `ActivityEvent`: what the application hands to [`crate::TelemetryClient`],
//! a builder over `picket.v1.Event` with the same field names as the Python
//! SDK's `ActivityEvent`.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::pb;

/// `source_system` of events this crate sends unless the caller sets one.
pub const SOURCE_SYSTEM: &str = "picket-sdk-rust";

/// One security event to send. Unset fields stay empty; the client fills
/// `service` and `environment` from its configuration, `occurred_at` with
/// the enqueue time, and an idempotency key when none is given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActivityEvent {
    /// The event as it will be sent.
    pub(crate) event: pb::Event,
}

/// Whether an action succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// It failed or was denied.
    Failure,
    /// The source does not know.
    Unknown,
}

/// Severity as the source reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Routine activity.
    Info,
    /// Worth recording.
    Low,
    /// Look at it within a working day.
    Medium,
    /// Look at it within the hour.
    High,
    /// Page someone.
    Critical,
}

/// Lower-cases `event_type` and replaces characters outside `a-z0-9_.-`
/// with `_` (Picket's rule for event types), as the Python SDK does.
pub fn normalize_event_type(event_type: &str) -> String {
    event_type
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl ActivityEvent {
    /// An event of `event_type` (e.g. `user.login`, `http_request`).
    pub fn new(event_type: &str) -> Self {
        Self {
            event: pb::Event {
                event_type: normalize_event_type(event_type),
                ..Default::default()
            },
        }
    }

    /// When it happened (default: when it is enqueued).
    pub fn timestamp(mut self, at: SystemTime) -> Self {
        self.event.occurred_at = Some(prost_types::Timestamp::from(at));
        self
    }

    /// Who acted.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.event.actor = actor.into();
        self
    }

    /// What was done (`login`, `GET`, `grant_role`).
    pub fn action(mut self, action: impl Into<String>) -> Self {
        self.event.action = action.into();
        self
    }

    /// What it was done to (a path, a table, a tenant).
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.event.resource = resource.into();
        self
    }

    /// The client's IP address (`source_ip`).
    pub fn ip(mut self, ip: impl Into<String>) -> Self {
        self.event.source_ip = ip.into();
        self
    }

    /// The system that produced it (`source_system`; default `picket-sdk-rust`).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.event.source_system = source.into();
        self
    }

    /// The service it is about (default: the client's `service_name`).
    pub fn service_name(mut self, service: impl Into<String>) -> Self {
        self.event.service = service.into();
        self
    }

    /// The environment (default: the client's `environment`).
    pub fn environment(mut self, environment: impl Into<String>) -> Self {
        self.event.environment = environment.into();
        self
    }

    /// The User-Agent (`http.user_agent`, or attribute `user_agent` when the
    /// event has no HTTP details).
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        let ua = user_agent.into();
        match &mut self.event.http {
            Some(http) => http.user_agent = ua,
            None => {
                self.event.attributes.insert("user_agent".into(), ua);
            }
        }
        self
    }

    /// A free-form attribute (`extras` in the Python SDK).
    pub fn extra(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.event.attributes.insert(key.into(), value.into());
        self
    }

    /// Several attributes at once.
    pub fn extras(mut self, extras: HashMap<String, String>) -> Self {
        self.event.attributes.extend(extras);
        self
    }

    /// The idempotency key (generated when not given): a resend with the
    /// same key is stored once.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.event.idempotency_key = key.into();
        self
    }

    /// Whether it succeeded.
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.event.outcome = match outcome {
            Outcome::Success => pb::Outcome::Success,
            Outcome::Failure => pb::Outcome::Failure,
            Outcome::Unknown => pb::Outcome::Unknown,
        } as i32;
        self
    }

    /// How severe the source says it is.
    pub fn severity(mut self, severity: Severity) -> Self {
        self.event.severity = match severity {
            Severity::Info => pb::Severity::Info,
            Severity::Low => pb::Severity::Low,
            Severity::Medium => pb::Severity::Medium,
            Severity::High => pb::Severity::High,
            Severity::Critical => pb::Severity::Critical,
        } as i32;
        self
    }

    /// HTTP details (method, path, status, latency, route, ...). A user agent
    /// set before moves into them.
    pub fn http(mut self, mut http: pb::HttpDetails) -> Self {
        if http.user_agent.is_empty()
            && let Some(ua) = self.event.attributes.remove("user_agent")
        {
            http.user_agent = ua;
        }
        self.event.http = Some(http);
        self
    }

    /// The event as it stands (before the client's defaults).
    pub fn as_proto(&self) -> &pb::Event {
        &self.event
    }
}

impl From<pb::Event> for ActivityEvent {
    /// Sends a `picket.v1.Event` as it is (the client still fills the
    /// empty defaults).
    fn from(event: pb::Event) -> Self {
        Self { event }
    }
}

impl From<ActivityEvent> for pb::Event {
    fn from(e: ActivityEvent) -> Self {
        e.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_normalized() {
        assert_eq!(normalize_event_type("User Login!"), "user_login_");
        assert_eq!(normalize_event_type("vpn.connect-2"), "vpn.connect-2");
    }

    #[test]
    fn user_agent_moves_into_http_details() {
        let e = ActivityEvent::new("x")
            .user_agent("curl")
            .http(pb::HttpDetails::default());
        assert_eq!(e.event.http.unwrap().user_agent, "curl");
        assert!(e.event.attributes.is_empty());
        let e = ActivityEvent::new("x").user_agent("curl");
        assert_eq!(e.event.attributes["user_agent"], "curl");
    }
}
