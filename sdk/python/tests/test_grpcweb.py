"""The grpc-web status decoding: RetryInfo from grpc-status-details-bin."""

from __future__ import annotations

import base64

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from picket._grpcweb import StatusCode, _parse_trailer, _status_from


def test_retry_info_is_read_from_the_status_details() -> None:
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=8, message="overloaded", details=[detail])
    # Servers send it unpadded (tonic does); both forms must decode.
    for encoded in (base64.b64encode(status.SerializeToString()).decode(),
                    base64.b64encode(status.SerializeToString()).decode().rstrip("=")):
        trailer = f"grpc-status: 8\r\ngrpc-message: over%20loaded\r\ngrpc-status-details-bin: {encoded}\r\n"
        error = _status_from(_parse_trailer(trailer.encode()))
        assert error is not None
        assert error.code == StatusCode.RESOURCE_EXHAUSTED
        assert error.message == "over loaded"
        assert error.retry_delay_s == 2.5


def test_ok_and_missing_status() -> None:
    assert _status_from({"grpc-status": "0"}) is None
    missing = _status_from({})
    assert missing is not None and missing.code == StatusCode.UNKNOWN
