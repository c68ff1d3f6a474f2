"""``TelemetryClient``: a bounded, fork-safe batching sender with receipts.

Contract:

* ``enqueue_event`` never blocks on the network and never raises. It appends
  to a bounded buffer; when the buffer (queued plus in flight) already holds
  ``max_queue_size`` events, the *new* event is dropped and counted as
  ``queue_full`` (the events already accepted are never evicted).
* One background thread per process sends batches of up to
  ``max_batch_size`` events every ``flush_interval_s`` (sooner when a batch is
  full) with ``IngestService.Ingest``. An event leaves the buffer only when its
  receipt says ACCEPTED or DUPLICATE. Every event carries an idempotency key
  (generated when absent), so a resend after a lost answer is stored once.
* UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED and RESOURCE_EXHAUSTED with RetryInfo
  are retried with jittered exponential backoff (never sooner than RetryInfo
  says), up to ``max_retry_attempts`` retries per batch; then the batch is
  dropped as ``retries_exhausted``. RESOURCE_EXHAUSTED without RetryInfo (a
  batch over the server's message size) splits the batch. REJECTED receipts,
  and statuses that cannot succeed on a resend (UNAUTHENTICATED,
  PERMISSION_DENIED, INVALID_ARGUMENT, ...), drop their events as
  ``rejected``, reported to ``on_rejected`` and logged.
* ``close()`` stops intake, sends what it can before ``shutdown_timeout_s``,
  and counts the rest as ``shutdown_deadline``; it returns the final stats.
* Fork: an ``os.register_at_fork`` hook (and a pid check on every call, for
  servers that fork without running it) gives the child fresh locks, an empty
  buffer (the parent still owns and sends what it had queued), and no sender
  thread or connection: both are made anew on the child's first event.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from picket._grpcweb import Channel, RpcError, StatusCode
from picket.event import ActivityEvent, to_proto
from picket.v1 import ingest_pb2

if TYPE_CHECKING:
    from picket.enforcement import DecisionCache

log = logging.getLogger("picket")

#: Drop reasons, as keys of ``ClientStats.dropped``.
DROP_REASONS = ("queue_full", "rejected", "retries_exhausted", "shutdown_deadline")

_INGEST = "/picket.v1.IngestService/Ingest"
_RETRYABLE = {StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.ABORTED}
# Stay under the server's default 4 MiB message limit.
_MAX_BATCH_BYTES = 3 * 1024 * 1024
# Field 1 (IngestRequest.events), wire type 2 (length-delimited).
_EVENTS_TAG = b"\x0a"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass(frozen=True)
class ClientStats:
    """Counters of one client in this process."""

    #: Events accepted by ``enqueue_event`` into the buffer.
    enqueued: int
    #: Events whose receipt was ACCEPTED.
    accepted: int
    #: Events whose receipt was DUPLICATE (already stored: a resend).
    duplicates: int
    #: Dropped events by reason; every reason in DROP_REASONS is present.
    dropped: dict[str, int]
    #: Events in the buffer now (queued or in flight).
    buffered: int
    #: Ingest calls that failed and were retried.
    retries: int

    @property
    def delivered(self) -> int:
        """Events Picket has stored (accepted now or before)."""
        return self.accepted + self.duplicates

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass
class _Counters:
    enqueued: int = 0
    accepted: int = 0
    duplicates: int = 0
    retries: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


_Item = tuple[ActivityEvent, str, int]

# Live clients, for the fork hooks (weak: a client never lives longer for it).
_CLIENTS: weakref.WeakSet[TelemetryClient] = weakref.WeakSet()


def _before_fork() -> None:
    for c in list(_CLIENTS):
        c._lock.acquire()


def _after_fork_parent() -> None:
    for c in list(_CLIENTS):
        c._lock.release()


def _after_fork_child() -> None:
    for c in list(_CLIENTS):
        c._reset_after_fork()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child
)


class TelemetryClient:
    """Sends ActivityEvents to Picket in the background.

    ``endpoint`` is Picket's address (``http://host:port`` or
    ``https://host:port``), ``api_key`` a Picket API key with the ``ingest``
    scope (and ``read`` for enforcement). TLS: ``tls_verify`` (False, or a CA
    bundle path) and ``tls_client_cert`` (cert path, or (cert, key)).
    """

    def __init__(
        self,
        api_key: str,
        endpoint: str = "http://127.0.0.1:50051",
        service_name: str = "",
        environment: str = "",
        flush_interval_s: float = 5.0,
        max_batch_size: int = 100,
        max_retry_attempts: int = 3,
        *,
        max_queue_size: int = 10_000,
        shutdown_timeout_s: float = 5.0,
        request_timeout_s: float = 10.0,
        retry_initial_backoff_s: float = 1.0,
        retry_max_backoff_s: float = 30.0,
        tls_verify: bool | str = True,
        tls_client_cert: str | tuple[str, str] | None = None,
        on_rejected: Callable[[ActivityEvent, str, str], None] | None = None,
        on_drop: Callable[[str, list[ActivityEvent]], None] | None = None,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            endpoint = "http://" + endpoint
        self.api_key = api_key
        self.endpoint = endpoint
        self.service_name = service_name
        self.environment = environment
        self.flush_interval_s = max(0.01, float(flush_interval_s))
        self.max_batch_size = max(1, min(1000, int(max_batch_size)))
        self.max_retry_attempts = max(0, int(max_retry_attempts))
        self.max_queue_size = max(1, int(max_queue_size))
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        self.request_timeout_s = float(request_timeout_s)
        self.retry_initial_backoff_s = float(retry_initial_backoff_s)
        self.retry_max_backoff_s = float(retry_max_backoff_s)
        self.tls_verify = tls_verify
        self.tls_client_cert = tls_client_cert
        self.on_rejected = on_rejected
        self.on_drop = on_drop
        self._lock = threading.Lock()
        self._init_process_state()
        self._decisions: DecisionCache | None = None
        _CLIENTS.add(self)
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- per-process state -------------------------------------------------

    def _init_process_state(self) -> None:
        """State that belongs to one process (re-made after fork)."""
        self._pid = os.getpid()
        self._cond = threading.Condition(self._lock)
        # (event, idempotency key, sequence number) in arrival order.
        self._queue: deque[_Item] = deque()
        self._seq = itertools.count()
        # Generated idempotency keys: a random 128-bit prefix per process (a
        # forked child draws its own) and a counter; unique without a
        # syscall per event.
        self._key_prefix = uuid.uuid4().hex + "-"
        self._keys = itertools.count()
        # Taken by the sender, not yet settled: sequence number -> event.
        self._in_flight: dict[int, ActivityEvent] = {}
        self._counters = _Counters()
        self._closing = False
        self._closed = False
        self._close_deadline = float("inf")
        self._flush_requested = False
        self._abandoned = False
        self._worker: threading.Thread | None = None
        self._channel: Channel | None = None
        self._last_flush = time.monotonic()
        self._flushed = threading.Condition(self._lock)

    def _reset_after_fork(self) -> None:
        # The inherited lock was taken by _before_fork in the parent: make a
        # new one. The queue is the parent's to send; counters start at zero.
        self._lock = threading.Lock()
        self._init_process_state()
        if self._decisions is not None:
            self._decisions._reset_after_fork()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._reset_after_fork()

    def _channel_for_worker(self) -> Channel:
        if self._channel is None:
            self._channel = self.new_channel()
        return self._channel

    def new_channel(self) -> Channel:
        """A fresh grpc-web channel to the endpoint (for this process only)."""
        return Channel(
            self.endpoint,
            self.api_key,
            verify=self.tls_verify,
            client_cert=self.tls_client_cert,
            connect_timeout_s=min(5.0, self.request_timeout_s),
        )

    # -- public API ---------------------------------------------------------

    def enqueue_event(self, event: ActivityEvent | None = None, /, **fields: Any) -> bool:
        """Queues an event (an ActivityEvent, or its fields as keywords).

        Never blocks on IO and never raises; returns whether the event was
        queued (False: dropped and counted, see ``stats()``).
        """
        try:
            if self._pid != os.getpid():  # forked without the hooks: reset first
                self._check_pid()
            if event is None:
                event = ActivityEvent(**fields)
            key = event.idempotency_key or f"{self._key_prefix}{next(self._keys):x}"
            with self._lock:
                if self._closing:
                    self._counters.dropped["shutdown_deadline"] += 1
                    dropped = True
                elif len(self._queue) + len(self._in_flight) >= self.max_queue_size:
                    self._counters.dropped["queue_full"] += 1
                    dropped = True
                else:
                    dropped = False
                    self._queue.append((event, key, next(self._seq)))
                    self._counters.enqueued += 1
                    if self._worker is None:
                        self._start_worker()
                    elif len(self._queue) == 1 or len(self._queue) >= self.max_batch_size:
                        # The sender sleeps until the first event arrives,
                        # then until its flush time or a full batch.
                        self._cond.notify()
            if dropped:
                self._report_drop("queue_full" if not self._closing else "shutdown_deadline", [event])
            return not dropped
        except Exception:  # never into the application (e.g. unknown keywords)
            log.exception("picket: enqueue_event failed; event dropped as rejected")
            try:
                with self._lock:
                    self._counters.dropped["rejected"] += 1
            except Exception:
                pass
            return False

    def flush(self, timeout_s: float | None = None) -> bool:
        """Sends everything queued now; True if the buffer emptied in time."""
        self._check_pid()
        deadline = time.monotonic() + (self.shutdown_timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            self._flush_requested = True
            self._cond.notify_all()
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0 or self._worker is None:
                    return False
                self._flushed.wait(left)
            return True

    def stats(self) -> ClientStats:
        """This process's counters (a child process starts from zero)."""
        self._check_pid()
        with self._lock:
            c = self._counters
            return ClientStats(
                enqueued=c.enqueued,
                accepted=c.accepted,
                duplicates=c.duplicates,
                dropped=dict(c.dropped),
                buffered=len(self._queue) + len(self._in_flight),
                retries=c.retries,
            )

    def close(self, timeout_s: float | None = None) -> ClientStats:
        """Stops intake, sends what it can within ``timeout_s`` (default
        ``shutdown_timeout_s``), drops the rest as ``shutdown_deadline`` and
        returns the final stats. Safe to call twice."""
        self._check_pid()
        timeout = self.shutdown_timeout_s if timeout_s is None else float(timeout_s)
        with self._lock:
            if not self._closing:
                self._closing = True
                self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(max(0.0, self._close_deadline - time.monotonic()) + 0.5)
        with self._lock:
            left = list(self._in_flight.values()) + [item[0] for item in self._queue]
            self._queue.clear()
            if self._in_flight:
                self._abandoned = True  # the sender may still be in a call
                self._in_flight = {}
            self._counters.dropped["shutdown_deadline"] += len(left)
            self._closed = True
        if left:
            log.warning(
                "picket: %d events not sent before the shutdown deadline (%.1f s)",
                len(left),
                timeout,
            )
            self._report_drop("shutdown_deadline", left)
        if self._decisions is not None:
            self._decisions.close()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        return self.stats()

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decisions(self, failure_mode: str = "last_known") -> DecisionCache:
        """This client's local copy of the tenant's effective decisions
        (started on first use; see ``picket.enforcement``)."""
        from picket.enforcement import DecisionCache

        with self._lock:
            if self._decisions is None:
                self._decisions = DecisionCache(self, failure_mode=failure_mode)
            return self._decisions

    # -- the sender thread ---------------------------------------------------

    def _start_worker(self) -> None:
        # Called with the lock held.
        self._worker = threading.Thread(target=self._run, name="picket-sender", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._deliver(batch)
                with self._lock:
                    self._last_flush = time.monotonic()
                    if not self._queue and not self._in_flight:
                        self._flush_requested = False
                        self._flushed.notify_all()
        except Exception:
            log.exception("picket: sender thread failed")
        finally:
            with self._lock:
                self._flushed.notify_all()

    def _next_batch(self) -> list[_Item] | None:
        """Waits for a batch to send; None once closing with nothing left."""
        with self._lock:
            while True:
                if self._closing and (not self._queue or time.monotonic() >= self._close_deadline):
                    return None
                if self._queue and (
                    self._closing
                    or self._flush_requested
                    or len(self._queue) >= self.max_batch_size
                    or time.monotonic() - self._last_flush >= self.flush_interval_s
                ):
                    n = min(self.max_batch_size, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(n)]
                    for e, _, seq in batch:
                        self._in_flight[seq] = e
                    return batch
                if not self._queue:
                    self._last_flush = time.monotonic()
                    self._cond.wait()
                else:
                    self._cond.wait(max(0.0, self._last_flush + self.flush_interval_s - time.monotonic()))

    def _finish(self, outcome: str, items: list[_Item]) -> None:
        """Takes ``items`` out of the buffer as ``outcome``."""
        with self._lock:
            if self._abandoned:
                return
            for _, _, seq in items:
                self._in_flight.pop(seq, None)
            c = self._counters
            if outcome == "accepted":
                c.accepted += len(items)
            elif outcome == "duplicate":
                c.duplicates += len(items)
            else:
                c.dropped[outcome] += len(items)
        if outcome not in ("accepted", "duplicate"):
            self._report_drop(outcome, [item[0] for item in items])

    def _report_drop(self, reason: str, events: list[ActivityEvent]) -> None:
        if not events:
            return
        if reason != "shutdown_deadline":
            log.warning("picket: dropped %d events (%s)", len(events), reason)
        if self.on_drop is not None:
            try:
                self.on_drop(reason, events)
            except Exception:
                log.exception("picket: on_drop callback failed")

    def _reject(self, item: _Item, field_path: str, reason: str) -> None:
        log.warning(
            "picket: event %s rejected: %s: %s", item[1], field_path or "(event)", reason
        )
        if self.on_rejected is not None:
            try:
                self.on_rejected(item[0], field_path, reason)
            except Exception:
                log.exception("picket: on_rejected callback failed")
        self._finish("rejected", [item])

    def _deliver(self, batch: list[_Item]) -> None:
        """Sends ``batch`` until every event has a final outcome.

        Each event is encoded on its own, as its ``IngestRequest.events``
        entry, and the request is their concatenation: no single protobuf
        call holds the GIL for a whole batch, and the sender yields it every
        four events, so the application's threads wait at most that long.
        """
        encoded: list[tuple[_Item, bytes]] = []
        size = 0
        for n, item in enumerate(batch):
            if n % 4 == 3:
                time.sleep(0)  # let the application's threads run (~40 us chunks)
            try:
                body = to_proto(item[0], item[1], self.service_name, self.environment).SerializeToString()
            except Exception as e:  # e.g. a string that is not valid Unicode
                self._reject(item, "", f"could not encode: {type(e).__name__}: {e}")
                continue
            entry = _EVENTS_TAG + _varint(len(body)) + body
            if encoded and size + len(entry) > _MAX_BATCH_BYTES:
                self._send(encoded)
                encoded, size = [], 0
            encoded.append((item, entry))
            size += len(entry)
        if encoded:
            self._send(encoded)

    def _send(self, pending: list[tuple[_Item, bytes]]) -> None:
        attempt = 0
        while pending:
            if self._closing and time.monotonic() >= self._close_deadline:
                return  # close() counts what is still in flight
            timeout = self.request_timeout_s
            if self._closing:
                timeout = max(0.05, min(timeout, self._close_deadline - time.monotonic()))
            request = b"".join(entry for _, entry in pending)
            try:
                response = self._channel_for_worker().unary_encoded(
                    _INGEST, request, ingest_pb2.IngestResponse, timeout
                )
            except RpcError as e:
                if (
                    e.code == StatusCode.RESOURCE_EXHAUSTED
                    and e.retry_delay_s is None
                    and len(pending) > 1
                ):
                    half = len(pending) // 2
                    self._send(pending[:half])
                    pending = pending[half:]
                    continue
                retryable = e.code in _RETRYABLE or (
                    e.code == StatusCode.RESOURCE_EXHAUSTED and e.retry_delay_s is not None
                )
                if not retryable:
                    log.error("picket: ingest refused (%s); dropping %d events", e, len(pending))
                    for item, _ in pending:
                        self._reject(item, "", f"{e.code.name}: {e.message}")
                    return
                if attempt >= self.max_retry_attempts:
                    log.warning(
                        "picket: ingest failed %d times (%s); dropping %d events",
                        attempt + 1,
                        e,
                        len(pending),
                    )
                    self._finish("retries_exhausted", [item for item, _ in pending])
                    return
                ceiling = min(self.retry_max_backoff_s, self.retry_initial_backoff_s * 2**attempt)
                delay = random.uniform(ceiling / 2, ceiling)
                if e.retry_delay_s is not None:
                    delay = max(delay, e.retry_delay_s)
                attempt += 1
                with self._lock:
                    self._counters.retries += 1
                log.info("picket: ingest failed (%s); retry %d in %.2f s", e, attempt, delay)
                self._sleep(delay)
                continue
            retry: list[tuple[_Item, bytes]] = []
            receipts = {r.index: r for r in response.receipts}
            accepted, duplicate = [], []
            for i, (item, pb) in enumerate(pending):
                r = receipts.get(i)
                status = r.status if r is not None else 0
                if status == ingest_pb2.RECEIPT_STATUS_ACCEPTED:
                    accepted.append(item)
                elif status == ingest_pb2.RECEIPT_STATUS_DUPLICATE:
                    duplicate.append(item)
                elif status == ingest_pb2.RECEIPT_STATUS_REJECTED:
                    assert r is not None
                    self._reject(item, r.field_path, r.reason)
                else:
                    retry.append((item, pb))
            if accepted:
                self._finish("accepted", accepted)
            if duplicate:
                self._finish("duplicate", duplicate)
            pending = retry

    def _sleep(self, delay: float) -> None:
        """Backoff that ends early at the close deadline."""
        end = time.monotonic() + delay
        with self._lock:
            while True:
                now = time.monotonic()
                stop = min(end, self._close_deadline) if self._closing else end
                if now >= stop:
                    return
                self._cond.wait(stop - now)


def _close_at_exit(ref: weakref.ref[TelemetryClient]) -> None:
    client = ref()
    if client is not None and not client._closed and client._pid == os.getpid():
        try:
            client.close()
        except Exception:
            log.exception("picket: close at exit failed")
