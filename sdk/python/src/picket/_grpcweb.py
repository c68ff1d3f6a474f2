"""gRPC-web over HTTP/1.1 with httpx: the SDK's transport.

Picket serves gRPC-web on its gRPC port (HTTP/1.1, same listener). Speaking it
with a plain HTTP client instead of grpcio keeps the SDK free of grpcio's
C-core threads and its ``fork()`` restrictions: an ``httpx.Client`` is plain
Python sockets, so a child process simply builds a new one (see
``TelemetryClient``'s fork handling) and never touches its parent's.

Framing (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md): the
request body is one frame ``0x00 | u32 length | message``; the response body
holds data frames (flag 0x00) and one trailer frame (flag 0x80) whose payload
is ``name: value\\r\\n`` lines with ``grpc-status``, ``grpc-message`` and
``grpc-status-details-bin``. A "trailers-only" answer carries them in the HTTP
headers instead, with an empty body.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from enum import IntEnum
from typing import TypeVar
from urllib.parse import unquote

import httpx
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

CONTENT_TYPE = "application/grpc-web+proto"
USER_AGENT = "picket-sdk-python/0.1"
_HEADER = struct.Struct(">BI")
_TRAILER_FLAG = 0x80
#: Largest response message accepted (a QueryEvents page of 1,000 64 KiB events).
MAX_RESPONSE_MESSAGE = 80 * 1024 * 1024

M = TypeVar("M", bound=Message)


class StatusCode(IntEnum):
    """gRPC status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# gRPC's mapping of HTTP statuses for answers that are not gRPC at all
# (a proxy's 502, a load balancer's 503).
_HTTP_TO_GRPC = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


class RpcError(Exception):
    """A call that ended with a non-OK status (or never reached the server)."""

    def __init__(self, code: StatusCode, message: str, retry_delay_s: float | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        #: The server's ``google.rpc.RetryInfo`` delay, when it sent one.
        self.retry_delay_s = retry_delay_s


def frame(message: Message) -> bytes:
    """One grpc-web data frame holding ``message``."""
    body = message.SerializeToString()
    return _HEADER.pack(0, len(body)) + body


def _status_from(fields: dict[str, str]) -> RpcError | None:
    """The error the grpc-status fields describe, or None for OK."""
    raw = fields.get("grpc-status")
    if raw is None:
        return RpcError(StatusCode.UNKNOWN, "response carried no grpc-status")
    try:
        code = StatusCode(int(raw.strip()))
    except ValueError:
        code = StatusCode.UNKNOWN
    if code == StatusCode.OK:
        return None
    message = unquote(fields.get("grpc-message", ""))
    retry: float | None = None
    details = fields.get("grpc-status-details-bin")
    if details:
        try:
            padded = details.strip() + "=" * (-len(details.strip()) % 4)
            status = status_pb2.Status.FromString(base64.b64decode(padded))
            for any_detail in status.details:
                info = error_details_pb2.RetryInfo()
                if any_detail.Unpack(info):
                    retry = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        except (ValueError, DecodeError):
            pass
    return RpcError(code, message, retry)


def _parse_trailer(payload: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in payload.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


class _Frames:
    """Incremental grpc-web frame parser."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes]]:
        self._buf += chunk
        while len(self._buf) >= _HEADER.size:
            flag, length = _HEADER.unpack_from(self._buf)
            if length > MAX_RESPONSE_MESSAGE:
                raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"response frame of {length} bytes")
            end = _HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            yield flag, payload

    @property
    def pending(self) -> int:
        return len(self._buf)


class Channel:
    """A grpc-web connection pool to one Picket endpoint, for one process.

    Thread-safe (httpx's client is). Never use one across ``fork()``: build a
    new one in the child.
    """

    def __init__(
        self,
        endpoint: str,
        api_key: str | None,
        *,
        verify: bool | str = True,
        client_cert: str | tuple[str, str] | None = None,
        connect_timeout_s: float = 5.0,
        max_connections: int = 4,
    ) -> None:
        headers = {
            "content-type": CONTENT_TYPE,
            "accept": CONTENT_TYPE,
            "x-grpc-web": "1",
            "user-agent": USER_AGENT,
        }
        if api_key:
            headers["x-api-key"] = api_key
        self._connect_timeout_s = connect_timeout_s
        self._http = httpx.Client(
            base_url=endpoint.rstrip("/"),
            headers=headers,
            verify=verify,
            cert=client_cert,
            limits=httpx.Limits(max_connections=max_connections, keepalive_expiry=30.0),
            timeout=httpx.Timeout(30.0, connect=connect_timeout_s),
        )

    def close(self) -> None:
        self._http.close()

    def _headers(self, timeout_s: float | None) -> dict[str, str]:
        if timeout_s is None:
            return {}
        return {"grpc-timeout": f"{max(1, int(timeout_s * 1000))}m"}

    def unary(self, method: str, request: Message, response_type: type[M], timeout_s: float) -> M:
        """Calls ``method`` (``/picket.v1.Service/Rpc``); the response or RpcError."""
        return self.unary_encoded(method, request.SerializeToString(), response_type, timeout_s)

    def unary_encoded(
        self, method: str, request: bytes, response_type: type[M], timeout_s: float
    ) -> M:
        """``unary`` with the request message already encoded."""
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, self._connect_timeout_s))
        body = _HEADER.pack(0, len(request)) + request
        try:
            resp = self._http.post(
                method, content=body, headers=self._headers(timeout_s), timeout=timeout
            )
        except httpx.TimeoutException as e:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"no answer in {timeout_s:.3g} s") from e
        except httpx.HTTPError as e:
            raise RpcError(StatusCode.UNAVAILABLE, f"{type(e).__name__}: {e}") from e
        self._check_http(resp)
        frames = _Frames()
        message: bytes | None = None
        trailer: dict[str, str] | None = None
        for flag, payload in frames.feed(resp.content):
            if flag & _TRAILER_FLAG:
                trailer = _parse_trailer(payload)
            elif message is None:
                message = payload
        fields = trailer if trailer is not None else {k.lower(): v for k, v in resp.headers.items()}
        error = _status_from(fields)
        if error is not None:
            raise error
        if message is None:
            raise RpcError(StatusCode.INTERNAL, "OK response without a message")
        try:
            return response_type.FromString(message)
        except DecodeError as e:
            raise RpcError(StatusCode.INTERNAL, f"undecodable response: {e}") from e

    def server_stream(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        read_timeout_s: float,
    ) -> Iterator[M]:
        """Calls a server-streaming ``method``; yields its messages as they
        arrive. Raises RpcError when it ends with a non-OK status, or when no
        byte arrives for ``read_timeout_s`` (DEADLINE_EXCEEDED)."""
        timeout = httpx.Timeout(read_timeout_s, connect=self._connect_timeout_s)
        try:
            with self._http.stream("POST", method, content=frame(request), timeout=timeout) as resp:
                self._check_http(resp)
                frames = _Frames()
                trailer: dict[str, str] | None = None
                for chunk in resp.iter_raw():
                    for flag, payload in frames.feed(chunk):
                        if flag & _TRAILER_FLAG:
                            trailer = _parse_trailer(payload)
                        else:
                            try:
                                yield response_type.FromString(payload)
                            except DecodeError as e:
                                raise RpcError(StatusCode.INTERNAL, f"undecodable message: {e}") from e
                fields = trailer if trailer is not None else {k.lower(): v for k, v in resp.headers.items()}
                if trailer is None and "grpc-status" not in fields:
                    raise RpcError(StatusCode.UNAVAILABLE, "stream ended without a status")
                error = _status_from(fields)
                if error is not None:
                    raise error
        except httpx.TimeoutException as e:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"nothing received for {read_timeout_s:.3g} s") from e
        except httpx.HTTPError as e:
            raise RpcError(StatusCode.UNAVAILABLE, f"{type(e).__name__}: {e}") from e

    @staticmethod
    def _check_http(resp: httpx.Response) -> None:
        if resp.status_code != 200:
            code = _HTTP_TO_GRPC.get(resp.status_code, StatusCode.UNKNOWN)
            if "grpc-status" in resp.headers:
                error = _status_from({k.lower(): v for k, v in resp.headers.items()})
                if error is not None:
                    raise error
            raise RpcError(code, f"HTTP {resp.status_code}")
