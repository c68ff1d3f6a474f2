"""Picket's Python SDK: a telemetry client, ASGI middleware and enforcement.

    from picket import TelemetryClient, ActivityEvent
    from picket.middleware import SecurityMonitoringMiddleware

See the package README for the delivery contract (receipts, retries, drop
accounting, fork safety) and the transport (grpc-web over HTTP/1.1).
"""

from picket._grpcweb import RpcError, StatusCode
from picket.client import DROP_REASONS, ClientStats, TelemetryClient
from picket.enforcement import DecisionCache, Verdict
from picket.event import ActivityEvent, HttpInfo

__all__ = [
    "DROP_REASONS",
    "ActivityEvent",
    "ClientStats",
    "DecisionCache",
    "HttpInfo",
    "RpcError",
    "StatusCode",
    "TelemetryClient",
    "Verdict",
]
