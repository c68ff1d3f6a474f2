"""``SecurityMonitoringMiddleware``: one Picket event per HTTP request, for
any ASGI application (FastAPI, Starlette, ...), and optional enforcement of
Picket's decisions.

A pure ASGI middleware (no ``BaseHTTPMiddleware``): it wraps ``send`` to see
the status and count the body, so streaming responses pass through untouched
and are recorded when they end. What each request becomes:

* ``event_type`` ``http_request`` (OCSF HTTP Activity), ``action`` the method,
  ``resource`` the path, ``http`` with method, path, route template (the
  framework's, when it sets ``scope["route"]``), status, latency in ms, bytes
  in and out, user agent;
* ``outcome`` success below 400, failure otherwise;
* status 500 when the application raises before starting its response (the
  exception is re-raised unchanged); when it raises after starting (a broken
  stream), the status sent, outcome failure and attributes
  ``error`` (the exception type) and ``response_complete`` ``false``;
* ``ip``: the peer address, or, when the peer is one of ``trusted_proxies``,
  the right-most address of ``X-Forwarded-For`` that is not a trusted proxy;
* ``actor``: ``get_actor(scope)`` if given, else the ``actor_header`` header.

With ``enforce=True`` each request is first checked against the client's
local copy of decisions (``picket.enforcement``): a banned IP, range or actor
gets ``deny_status`` (403) and the application is not called; the event is
recorded with attribute ``enforced`` (``ip``, ``cidr``, ``actor`` or
``unavailable``).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from picket.client import TelemetryClient
from picket.enforcement import canonical_ip
from picket.event import ActivityEvent, HttpInfo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_MAX_PATH = 2048
_MAX_TEXT = 1024


class SecurityMonitoringMiddleware:
    """Records every HTTP request as a Picket event (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        client: TelemetryClient,
        exclude_paths: Iterable[str] | None = None,
        actor_header: str = "x-user-id",
        *,
        get_actor: Callable[[Scope], str | None] | None = None,
        trusted_proxies: Iterable[str] = (),
        event_type: str = "http_request",
        enforce: bool = False,
        failure_mode: str = "last_known",
        deny_status: int = 403,
        deny_body: bytes = b'{"detail":"Forbidden"}',
        deny_content_type: bytes = b"application/json",
    ) -> None:
        self.app = app
        self.client = client
        paths = list(exclude_paths or ())
        self._exclude_exact = frozenset(p for p in paths if not p.endswith("*"))
        self._exclude_prefix = tuple(p[:-1] for p in paths if p.endswith("*"))
        self._actor_header = actor_header.lower().encode("latin-1")
        self._get_actor = get_actor
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self._trusted_cache: dict[str, bool] = {}
        self._event_type = event_type
        self._decisions = client.decisions(failure_mode).start() if enforce else None
        self._deny_status = deny_status
        self._deny_body = deny_body
        self._deny_headers = [
            (b"content-type", deny_content_type),
            (b"content-length", str(len(deny_body)).encode()),
        ]

    def _excluded(self, path: str) -> bool:
        return path in self._exclude_exact or (
            bool(self._exclude_prefix) and path.startswith(self._exclude_prefix)
        )

    def _trusted(self, ip: str) -> bool:
        known = self._trusted_cache.get(ip)
        if known is None:
            addr = canonical_ip(ip)
            known = addr is not None and any(addr in net for net in self._proxies)
            if len(self._trusted_cache) >= 4096:
                self._trusted_cache.clear()
            self._trusted_cache[ip] = known
        return known

    def _client_ip(self, scope: Scope, forwarded: bytes | None) -> str:
        peer = scope.get("client")
        ip = peer[0] if peer else ""
        if forwarded and self._proxies and ip and self._trusted(ip):
            hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
            for hop in reversed(hops):
                ip = hop
                if not self._trusted(hop):
                    break
        return ip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._excluded(scope["path"]):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        wall = time.time()
        user_agent = actor = forwarded = None
        actor_header = self._actor_header
        for name, value in scope["headers"]:
            if name == b"user-agent":
                user_agent = value
            elif name == actor_header:
                actor = value
            elif name == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b"," + value
        ip = self._client_ip(scope, forwarded)
        actor_text: str | None
        if self._get_actor is not None:
            try:
                actor_text = self._get_actor(scope)
            except Exception:
                actor_text = None
        else:
            actor_text = actor.decode("latin-1") if actor else None

        status = 0
        bytes_in = 0
        bytes_out = 0
        started = False
        complete = False

        if self._decisions is not None:
            verdict = self._decisions.check(ip or None, actor_text)
            if not verdict.allowed:
                await send(
                    {
                        "type": "http.response.start",
                        "status": self._deny_status,
                        "headers": self._deny_headers,
                    }
                )
                await send({"type": "http.response.body", "body": self._deny_body})
                self._record(
                    scope, wall, start, ip, actor_text, user_agent, self._deny_status,
                    0, len(self._deny_body), {"enforced": verdict.why, "decision_id": verdict.decision_id},
                )
                return

        async def receive_counting() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def send_watching(message: Message) -> None:
            nonlocal status, started, bytes_out, complete
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                started = True
            elif kind == "http.response.body":
                bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    complete = True
            await send(message)

        try:
            await self.app(scope, receive_counting, send_watching)
        except BaseException as exc:
            extras = {"error": type(exc).__name__}
            if started:
                extras["response_complete"] = "false"
            self._record(
                scope, wall, start, ip, actor_text, user_agent, status if started else 500,
                bytes_in, bytes_out, extras, failed=True,
            )
            raise
        extras = {} if complete or not started else {"response_complete": "false"}
        self._record(
            scope, wall, start, ip, actor_text, user_agent, status or 500, bytes_in, bytes_out,
            extras, failed=bool(extras),
        )

    def _record(
        self,
        scope: Scope,
        wall: float,
        start: float,
        ip: str,
        actor: str | None,
        user_agent: bytes | None,
        status: int,
        bytes_in: int,
        bytes_out: int,
        extras: dict[str, str],
        failed: bool = False,
    ) -> None:
        try:
            path = scope["path"][:_MAX_PATH]
            method = scope["method"]
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or ""
            if ip and canonical_ip(ip) is None:
                extras["client_host"] = ip[:_MAX_TEXT]
                ip = ""
            self.client.enqueue_event(
                ActivityEvent(
                    event_type=self._event_type,
                    timestamp=wall,
                    actor=actor[:_MAX_TEXT] if actor else None,
                    resource=path,
                    action=method,
                    ip=ip or None,
                    user_agent=user_agent.decode("latin-1")[:_MAX_TEXT] if user_agent else None,
                    extras=extras,
                    outcome="failure" if failed or status >= 400 else "success",
                    http=HttpInfo(
                        method=method,
                        path=path,
                        status_code=status,
                        latency_ms=(time.perf_counter() - start) * 1000.0,
                        bytes_in=bytes_in,
                        bytes_out=bytes_out,
                        route=str(template)[:_MAX_TEXT],
                    ),
                )
            )
        except Exception:  # recording must never break the request
            pass
