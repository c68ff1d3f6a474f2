"""``ActivityEvent``: what an application reports, and how it maps onto
``picket.v1.Event``.

| ActivityEvent | picket.v1.Event |
|---|---|
| ``timestamp`` (datetime, naive = UTC, or epoch seconds; default now) | ``occurred_at`` |
| ``event_type`` (lower-cased; characters outside ``a-z0-9_.-`` become ``_``) | ``event_type`` |
| ``actor``, ``resource``, ``action`` | same names |
| ``source`` | ``source_system`` (default ``picket-sdk-python``) |
| ``ip`` | ``source_ip`` (an invalid address is REJECTED by Picket) |
| ``user_agent`` | ``http.user_agent`` when ``http`` is set, else ``attributes["user_agent"]`` |
| ``service_name``, ``environment`` | ``service``, ``environment`` (default: the client's) |
| ``extras`` (values: str as is, others JSON) | ``attributes`` |
| ``idempotency_key`` (generated when absent) | ``idempotency_key`` |
| ``outcome`` (``success``/``failure``/``unknown``), ``severity`` | ``outcome``, ``severity`` |
| ``http`` (:class:`HttpInfo`) | ``http`` (HTTP activity, OCSF 4002) |
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from picket.v1 import ingest_pb2

SOURCE_SYSTEM = "picket-sdk-python"
_EVENT_TYPE_BAD = re.compile(r"[^a-z0-9_.-]")
_MAX_EVENT_TYPE = 128


@dataclass(slots=True, kw_only=True)
class HttpInfo:
    """HTTP request details (``picket.v1.HttpDetails``)."""

    method: str
    path: str
    status_code: int = 0
    latency_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    route: str = ""


@dataclass(slots=True, kw_only=True)
class ActivityEvent:
    """One activity to report. Only ``event_type`` is required."""

    event_type: str
    timestamp: datetime | float | None = None
    actor: str | None = None
    resource: str | None = None
    action: str | None = None
    source: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    service_name: str | None = None
    environment: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    outcome: str | None = None
    severity: str | None = None
    http: HttpInfo | None = None

    def __post_init__(self) -> None:
        if self.timestamp is None:
            self.timestamp = time.time()


_OUTCOMES = {"success": 1, "failure": 2, "unknown": 3}
_SEVERITIES = {"info": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}


def normalize_event_type(event_type: str) -> str:
    """Picket's event type rule: 1..128 bytes of ``[a-z0-9_.-]``."""
    t = _EVENT_TYPE_BAD.sub("_", event_type.strip().lower())
    return t[:_MAX_EVENT_TYPE]


def _attribute(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(value)


def to_proto(
    event: ActivityEvent, key: str, default_service: str, default_environment: str
) -> Any:
    """The ``picket.v1.Event`` for ``event`` with idempotency key ``key``.

    Built with one constructor call (the protobuf runtime's C code does the
    work): this runs on the sender thread for every event.
    """
    ts = event.timestamp
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        ts = ts.timestamp()
    seconds = float(ts if ts is not None else time.time())
    whole = int(seconds // 1)
    event_type = event.event_type
    if _EVENT_TYPE_BAD.search(event_type) or len(event_type) > _MAX_EVENT_TYPE:
        event_type = normalize_event_type(event_type)
    attributes = {str(k): _attribute(v) for k, v in event.extras.items()} if event.extras else {}
    fields: dict[str, Any] = {
        "occurred_at": {"seconds": whole, "nanos": int((seconds - whole) * 1e9)},
        "event_type": event_type,
        "idempotency_key": key,
        "actor": event.actor or "",
        "action": event.action or "",
        "resource": event.resource or "",
        "source_ip": event.ip or "",
        "source_system": event.source or SOURCE_SYSTEM,
        "service": event.service_name or default_service,
        "environment": event.environment or default_environment,
    }
    if event.outcome:
        fields["outcome"] = _OUTCOMES.get(event.outcome.lower(), 3)
    if event.severity:
        fields["severity"] = _SEVERITIES.get(event.severity.lower(), 0)
    h = event.http
    if h is not None:
        fields["http"] = {
            "method": h.method,
            "path": h.path,
            "status_code": h.status_code,
            "latency_ms": h.latency_ms,
            "bytes_in": h.bytes_in,
            "bytes_out": h.bytes_out,
            "route": h.route,
            "user_agent": event.user_agent or "",
        }
    elif event.user_agent:
        attributes["user_agent"] = event.user_agent
    if attributes:
        fields["attributes"] = attributes
    return ingest_pb2.Event(**fields)
