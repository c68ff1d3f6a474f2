//! `SecurityLayer`: a `tower` layer that records one Picket event per HTTP
//! request for axum, hyper and tonic services, and optionally refuses
//! requests from banned IPs, ranges and actors before they reach the service.
//!
//! What each request becomes: `event_type` `http_request` (OCSF HTTP
//! Activity), `action` the method, `resource` the path, `http` with method,
//! path, route template (axum's `MatchedPath` when the layer runs after
//! routing, i.e. `Router::route_layer`; the path for gRPC), status, latency
//! in ms (until the response body ended), bytes in (`content-length`) and
//! out, user agent; `outcome` success below 400. gRPC calls (content type
//! `application/grpc…`) also carry attribute `grpc_status`, read from the
//! response headers (trailers-only answers) or the trailers, and are
//! failures when it is not 0. A service error is recorded as 500 with
//! attribute `error`; a response body that ended early (client gone, body
//! error) with `response_complete` `false`.
//!
//! The client IP is the peer (axum `ConnectInfo<SocketAddr>`, tonic
//! `TcpConnectInfo`, or a `SocketAddr` extension), or, when the peer is one
//! of `trusted_proxies`, the right-most `X-Forwarded-For` hop that is not a
//! trusted proxy. The actor is `actor_fn(parts)` when given, else the
//! `actor_header` (default `x-user-id`).
//!
//! With enforcement on, each request is first checked against the client's
//! [`DecisionCache`]: a denied request is answered 403 (gRPC: status
//! PERMISSION_DENIED) without calling the service and recorded with
//! attributes `enforced` (`ip`, `cidr`, `actor`, `unavailable`) and
//! `decision_id`.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use ipnet::IpNet;
use pin_project_lite::pin_project;

use crate::client::TelemetryClient;
use crate::decisions::{DecisionCache, FailureMode};
use crate::error::{ClientError, ClientResult};
use crate::event::ActivityEvent;
use crate::pb;

/// Longest path recorded (Picket's limit on `http.path`).
const MAX_PATH: usize = 2048;
/// Longest other text recorded.
const MAX_TEXT: usize = 1024;

/// Derives the actor from the request head.
pub type ActorFn = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

/// The layer (see the module documentation).
#[derive(Clone)]
pub struct SecurityLayer {
    config: Arc<LayerConfig>,
}

#[derive(Clone)]
struct LayerConfig {
    /// Where events go.
    client: TelemetryClient,
    /// Paths not recorded nor enforced, exactly.
    exclude_exact: HashSet<String>,
    /// Path prefixes (given as `prefix*`) not recorded nor enforced.
    exclude_prefix: Vec<String>,
    /// The header naming the actor.
    actor_header: HeaderName,
    /// Or a function deriving it.
    actor_fn: Option<ActorFn>,
    /// Peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<IpNet>,
    /// The recorded event type.
    event_type: String,
    /// Set when enforcing.
    decisions: Option<DecisionCache>,
}

impl std::fmt::Debug for SecurityLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityLayer")
            .field("exclude_exact", &self.config.exclude_exact)
            .field("exclude_prefix", &self.config.exclude_prefix)
            .field("actor_header", &self.config.actor_header)
            .field("trusted_proxies", &self.config.trusted_proxies)
            .field("enforce", &self.config.decisions.is_some())
            .finish()
    }
}

impl SecurityLayer {
    /// Records every request through `client`; no enforcement, no trusted
    /// proxies, actor from `x-user-id`.
    pub fn new(client: &TelemetryClient) -> Self {
        Self {
            config: Arc::new(LayerConfig {
                client: client.clone(),
                exclude_exact: HashSet::new(),
                exclude_prefix: Vec::new(),
                actor_header: HeaderName::from_static("x-user-id"),
                actor_fn: None,
                trusted_proxies: Vec::new(),
                event_type: "http_request".into(),
                decisions: None,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut LayerConfig)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Paths neither recorded nor enforced: exact paths, or prefixes ending in `*`.
    pub fn exclude_paths<I, P>(self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.edit(|c| {
            for p in paths {
                let p: String = p.into();
                match p.strip_suffix('*') {
                    Some(prefix) => c.exclude_prefix.push(prefix.to_owned()),
                    None => {
                        c.exclude_exact.insert(p);
                    }
                }
            }
        })
    }

    /// The header that names the actor (default `x-user-id`).
    pub fn actor_header(self, name: HeaderName) -> Self {
        self.edit(|c| c.actor_header = name)
    }

    /// Derives the actor from the request head instead of a header.
    pub fn actor_fn(
        self,
        f: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.edit(|c| c.actor_fn = Some(Arc::new(f)))
    }

    /// Peers (addresses or CIDR ranges) whose `X-Forwarded-For` is believed.
    pub fn trusted_proxies<I, P>(self, proxies: I) -> ClientResult<Self>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        let mut nets = Vec::new();
        for p in proxies {
            let p = p.as_ref().trim();
            let net = p
                .parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| ClientError::InvalidProxy(p.to_owned()))?;
            nets.push(net);
        }
        Ok(self.edit(|c| c.trusted_proxies = nets))
    }

    /// The recorded event type (default `http_request`).
    pub fn event_type(self, event_type: &str) -> Self {
        let t = crate::event::normalize_event_type(event_type);
        self.edit(|c| c.event_type = t)
    }

    /// Refuses requests from banned IPs, ranges and actors (403, or gRPC
    /// PERMISSION_DENIED), answering with `mode` while the decision copy is
    /// out of sync. Starts the client's decision cache.
    pub fn enforce(self, mode: FailureMode) -> Self {
        let cache = self.config.client.decisions(mode);
        self.edit(|c| c.decisions = Some(cache))
    }

    /// Enforces with a given cache (e.g. one shared by several layers).
    pub fn enforce_with(self, cache: DecisionCache) -> Self {
        self.edit(|c| c.decisions = Some(cache))
    }
}

impl<S> tower_layer::Layer<S> for SecurityLayer {
    type Service = SecurityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SecurityService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`SecurityLayer`] wraps around another.
#[derive(Clone)]
pub struct SecurityService<S> {
    inner: S,
    config: Arc<LayerConfig>,
}

impl<S> std::fmt::Debug for SecurityService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityService").finish_non_exhaustive()
    }
}

impl LayerConfig {
    fn excluded(&self, path: &str) -> bool {
        self.exclude_exact.contains(path)
            || self
                .exclude_prefix
                .iter()
                .any(|p| path.starts_with(p.as_str()))
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client IP: the peer, or the right-most untrusted
    /// `X-Forwarded-For` hop when the peer is a trusted proxy. `Err` holds a
    /// hop that is not an address.
    fn client_ip(
        &self,
        peer: Option<IpAddr>,
        headers: &HeaderMap,
    ) -> Result<Option<IpAddr>, String> {
        let Some(peer) = peer else {
            return Ok(None);
        };
        if self.trusted_proxies.is_empty() || !self.trusted(peer) {
            return Ok(Some(peer.to_canonical()));
        }
        let mut ip = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect::<Vec<_>>();
        for hop in hops.into_iter().rev() {
            ip = match parse_hop(hop) {
                Some(ip) => ip,
                None => return Err(clip(hop, MAX_TEXT).to_owned()),
            };
            if !self.trusted(ip) {
                break;
            }
        }
        Ok(Some(ip.to_canonical()))
    }
}

/// An `X-Forwarded-For` hop: an address, `[v6]`, or either with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
}

/// `s` cut to at most `max` bytes on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn peer_of(ext: &http::Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(addr.ip());
    }
    if let Some(info) = ext.get::<tonic::transport::server::TcpConnectInfo>() {
        return info.remote_addr().map(|a| a.ip());
    }
    ext.get::<SocketAddr>().map(|a| a.ip())
}

fn route_of(ext: &http::Extensions) -> Option<String> {
    #[cfg(feature = "axum")]
    if let Some(m) = ext.get::<axum::extract::MatchedPath>() {
        return Some(m.as_str().to_owned());
    }
    let _ = ext;
    None
}

/// What the recorder knows about the request.
struct RequestInfo {
    started: Instant,
    at: SystemTime,
    method: String,
    path: String,
    route: String,
    ip: Option<IpAddr>,
    actor: Option<String>,
    user_agent: Option<String>,
    bytes_in: u64,
    grpc: bool,
    attributes: Vec<(&'static str, String)>,
}

/// Records the request's event once, when the response ended (or was
/// abandoned: on drop).
struct Recorder {
    config: Arc<LayerConfig>,
    info: RequestInfo,
    status: u16,
    grpc_status: Option<i32>,
    bytes_out: u64,
    complete: bool,
}

impl Recorder {
    fn head(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.status = status.as_u16();
        self.read_grpc_status(headers);
    }

    fn read_grpc_status(&mut self, headers: &HeaderMap) {
        if let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
        {
            self.grpc_status = Some(code);
        }
    }

    fn record(&mut self) {
        let info = &mut self.info;
        let mut attributes = std::mem::take(&mut info.attributes);
        let grpc_failed = match self.grpc_status {
            Some(code) => {
                attributes.push(("grpc_status", code.to_string()));
                code != 0
            }
            None if info.grpc && self.complete && self.status == 200 => {
                // A gRPC answer must carry grpc-status; without one it failed.
                attributes.push(("grpc_status", "2".into()));
                true
            }
            None => false,
        };
        if !self.complete {
            attributes.push(("response_complete", "false".into()));
        }
        let failed = self.status >= 400 || grpc_failed || !self.complete;
        let http = pb::HttpDetails {
            method: clip(&info.method, 16).to_owned(),
            path: clip(&info.path, MAX_PATH).to_owned(),
            status_code: u32::from(self.status),
            latency_ms: info.started.elapsed().as_secs_f64() * 1000.0,
            bytes_in: info.bytes_in,
            bytes_out: self.bytes_out,
            user_agent: info
                .user_agent
                .as_deref()
                .map(|u| clip(u, MAX_TEXT).to_owned())
                .unwrap_or_default(),
            route: clip(&info.route, MAX_TEXT).to_owned(),
        };
        let mut event = ActivityEvent::new("")
            .timestamp(info.at)
            .action(clip(&info.method, MAX_TEXT))
            .resource(clip(&info.path, MAX_TEXT))
            .outcome(if failed {
                crate::event::Outcome::Failure
            } else {
                crate::event::Outcome::Success
            })
            .http(http);
        event.event.event_type.clone_from(&self.config.event_type);
        if let Some(ip) = info.ip {
            event = event.ip(ip.to_string());
        }
        if let Some(actor) = &info.actor {
            event = event.actor(clip(actor, MAX_TEXT));
        }
        for (k, v) in attributes {
            event = event.extra(k, v);
        }
        self.config.client.enqueue_event(event);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record();
    }
}

impl<S, ReqB, ResB> tower_service::Service<Request<ReqB>> for SecurityService<S>
where
    S: tower_service::Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
{
    type Response = Response<SecurityBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let config = &self.config;
        if config.excluded(req.uri().path()) {
            return ResponseFuture {
                kind: Kind::Call {
                    future: self.inner.call(req),
                    recorder: None,
                },
            };
        }
        let started = Instant::now();
        let at = SystemTime::now();
        let (parts, body) = req.into_parts();
        let headers = &parts.headers;
        let grpc = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let mut attributes = Vec::new();
        let ip = match config.client_ip(peer_of(&parts.extensions), headers) {
            Ok(ip) => ip,
            Err(host) => {
                attributes.push(("client_host", host));
                None
            }
        };
        let actor = match &config.actor_fn {
            Some(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&parts)))
                .unwrap_or_default(),
            None => headers
                .get(&config.actor_header)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
        .filter(|a| !a.is_empty());
        let path = parts.uri.path().to_owned();
        let route = if grpc {
            path.clone()
        } else {
            route_of(&parts.extensions).unwrap_or_default()
        };
        let info = RequestInfo {
            started,
            at,
            method: parts.method.as_str().to_owned(),
            path,
            route,
            ip,
            actor,
            user_agent: headers
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            bytes_in: headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            grpc,
            attributes,
        };
        let mut recorder = Recorder {
            config: config.clone(),
            info,
            status: 500,
            grpc_status: None,
            bytes_out: 0,
            complete: false,
        };
        if let Some(cache) = &config.decisions {
            let verdict = cache.check_request(recorder.info.ip, recorder.info.actor.as_deref());
            if !verdict.allowed {
                let why = verdict.reason.map(|r| r.as_str()).unwrap_or("unknown");
                recorder.info.attributes.push(("enforced", why.to_owned()));
                if let Some(id) = &verdict.decision_id {
                    recorder
                        .info
                        .attributes
                        .push(("decision_id", id.to_string()));
                }
                let (response, body) = deny_response(grpc);
                recorder.head(response.status(), response.headers());
                recorder.bytes_out = body.as_ref().map_or(0, |b| b.len() as u64);
                recorder.complete = true;
                drop(recorder);
                return ResponseFuture {
                    kind: Kind::Deny {
                        response: Some((response, body)),
                    },
                };
            }
        }
        let req = Request::from_parts(parts, body);
        ResponseFuture {
            kind: Kind::Call {
                future: self.inner.call(req),
                recorder: Some(recorder),
            },
        }
    }
}

/// The refusal: 403 with a small JSON body, or for gRPC a trailers-only
/// PERMISSION_DENIED.
fn deny_response(grpc: bool) -> (Response<()>, Option<Bytes>) {
    let mut response = Response::new(());
    if !grpc {
        *response.status_mut() = StatusCode::FORBIDDEN;
    }
    let headers = response.headers_mut();
    if grpc {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("7"));
        headers.insert("grpc-message", HeaderValue::from_static("forbidden"));
        (response, None)
    } else {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let body = Bytes::from_static(br#"{"detail":"Forbidden"}"#);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        (response, Some(body))
    }
}

pin_project! {
    /// The future of [`SecurityService`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Call {
            #[pin]
            future: F,
            recorder: Option<Recorder>,
        },
        Deny {
            response: Option<(Response<()>, Option<Bytes>)>,
        },
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<SecurityBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Call { future, recorder } => {
                let result = ready!(future.poll(cx));
                let mut recorder = recorder.take();
                Poll::Ready(match result {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        if let Some(r) = recorder.as_mut() {
                            r.head(parts.status, &parts.headers);
                        }
                        if body.is_end_stream()
                            && let Some(mut r) = recorder.take()
                        {
                            r.complete = true;
                        }
                        Ok(Response::from_parts(
                            parts,
                            SecurityBody::inner(body, recorder),
                        ))
                    }
                    Err(e) => {
                        if let Some(r) = recorder.as_mut() {
                            r.status = 500;
                            r.complete = true;
                            r.info.attributes.push(("error", "service_error".into()));
                        }
                        Err(e)
                    }
                })
            }
            KindProj::Deny { response } => {
                let (head, data) = response.take().unwrap_or_default();
                Poll::Ready(Ok(head.map(|()| SecurityBody::deny(data))))
            }
        }
    }
}

pin_project! {
    /// The response body: the service's, watched to count bytes, read the
    /// gRPC status from trailers and record the event when it ends; or the
    /// refusal's.
    pub struct SecurityBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyProj]
    enum BodyKind<B> {
        Inner {
            #[pin]
            body: B,
            recorder: Option<Recorder>,
        },
        Deny {
            data: Option<Bytes>,
        },
    }
}

impl<B> SecurityBody<B> {
    fn inner(body: B, recorder: Option<Recorder>) -> Self {
        Self {
            kind: BodyKind::Inner { body, recorder },
        }
    }

    fn deny(data: Option<Bytes>) -> Self {
        Self {
            kind: BodyKind::Deny { data },
        }
    }
}

impl<B> std::fmt::Debug for SecurityBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityBody").finish_non_exhaustive()
    }
}

impl<B> Body for SecurityBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            BodyProj::Inner { mut body, recorder } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                match &frame {
                    Some(Ok(f)) => {
                        if let Some(r) = recorder.as_mut() {
                            if let Some(data) = f.data_ref() {
                                r.bytes_out += data.len() as u64;
                            }
                            if let Some(trailers) = f.trailers_ref() {
                                r.read_grpc_status(trailers);
                            }
                        }
                        if body.is_end_stream()
                            && let Some(mut r) = recorder.take()
                        {
                            r.complete = true;
                        }
                    }
                    Some(Err(_)) => {
                        if let Some(r) = recorder.as_mut() {
                            r.info.attributes.push(("error", "body_error".into()));
                        }
                        recorder.take();
                    }
                    None => {
                        if let Some(mut r) = recorder.take() {
                            r.complete = true;
                        }
                    }
                }
                Poll::Ready(frame)
            }
            BodyProj::Deny { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Inner { body, .. } => body.is_end_stream(),
            BodyKind::Deny { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Inner { body, .. } => body.size_hint(),
            BodyKind::Deny { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(proxies: &[&str]) -> LayerConfig {
        LayerConfig {
            client: unreachable_client(),
            exclude_exact: HashSet::new(),
            exclude_prefix: vec!["/static/".into()],
            actor_header: HeaderName::from_static("x-user-id"),
            actor_fn: None,
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
            event_type: "http_request".into(),
            decisions: None,
        }
    }

    fn unreachable_client() -> TelemetryClient {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let client =
            TelemetryClient::new(crate::ClientConfig::new("pk_0_x", "http://127.0.0.1:9")).unwrap();
        std::mem::forget(rt);
        client
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let c = config(&["10.0.0.0/8", "127.0.0.1/32"]);
        let peer = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let ip = |s: &str| Ok(Some(s.parse::<IpAddr>().unwrap()));
        // Untrusted peer: the header is ignored.
        assert_eq!(
            c.client_ip(peer("203.0.113.5"), &xff("1.2.3.4")),
            ip("203.0.113.5")
        );
        // Trusted peer: the right-most hop that is not a proxy.
        assert_eq!(
            c.client_ip(peer("127.0.0.1"), &xff("6.6.6.6, 198.51.100.7, 10.1.2.3")),
            ip("198.51.100.7")
        );
        // Only proxies: the left-most.
        assert_eq!(
            c.client_ip(peer("10.0.0.1"), &xff("10.0.0.2")),
            ip("10.0.0.2")
        );
        assert_eq!(
            c.client_ip(peer("10.0.0.1"), &xff("[2001:db8::1]:443")),
            ip("2001:db8::1")
        );
        assert_eq!(
            c.client_ip(peer("10.0.0.1"), &xff("unknown")),
            Err("unknown".into())
        );
        assert!(c.excluded("/static/app.js"));
        assert!(!c.excluded("/api"));
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("abc", 10), "abc");
    }
}
