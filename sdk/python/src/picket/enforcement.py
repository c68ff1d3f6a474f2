"""A local copy of the tenant's effective decisions, kept in sync through
``EnforcementService.WatchDecisions``, answering "may this request proceed?"
in-process with no network call.

The watcher thread applies the snapshot, then deltas, storing the revision
after each applied message; on reconnect it resumes after that revision, and
replaces its whole state when the server answers with a new snapshot
(compacted or ahead). Entries carry their expiry and are ignored once it has
passed, with or without a connection.

Semantics follow ``CheckAccess``: on each dimension (the IP, with the ranges
containing it; the actor) an allow wins over a ban. A request is denied when
either dimension is banned. Throttles are not enforced here.

When the copy is not in sync (no snapshot yet, or nothing heard from the
server for three heartbeat intervals), ``failure_mode`` decides:
``fail_open`` allows everything, ``fail_closed`` denies everything,
``last_known`` (default) answers from the last copy, expiring on time.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from picket._grpcweb import RpcError

if TYPE_CHECKING:
    from picket.client import TelemetryClient

log = logging.getLogger("picket")

FAILURE_MODES = ("fail_open", "fail_closed", "last_known")
_WATCH = "/picket.v1.EnforcementService/WatchDecisions"
# picket.v1 enum numbers (DecisionScope, DecisionType, DeltaKind).
_SCOPE_IP, _SCOPE_CIDR, _SCOPE_ACTOR = 1, 2, 3
_BAN, _ALLOW = 1, 2
_ADDED, _UPDATED, _REMOVED, _EXPIRED = 1, 2, 3, 4

IpAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Entry:
    """One target's effective state."""

    type: int
    expires_at: float
    decision_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer for one request."""

    allowed: bool
    #: Why it was denied: ``ip``, ``cidr``, ``actor`` or ``unavailable``
    #: (fail_closed while out of sync); empty when allowed.
    why: str = ""
    decision_id: str = ""


ALLOW = Verdict(True)


@functools.lru_cache(maxsize=16_384)
def canonical_ip(text: str) -> IpAddr | None:
    """The address as Picket stores it (IPv4-mapped IPv6 becomes IPv4), or
    None if ``text`` is not an address. Cached: clients repeat."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _State:
    """The effective decisions by target."""

    def __init__(self) -> None:
        self.ips: dict[IpAddr, Entry] = {}
        self.actors: dict[str, Entry] = {}
        # (version, prefix length) -> network address as int -> entry
        self.ranges: dict[tuple[int, int], dict[int, Entry]] = {}

    def put(self, pb: Any) -> None:
        entry = Entry(
            type=pb.type,
            expires_at=pb.expires_at.seconds + pb.expires_at.nanos / 1e9,
            decision_id=pb.decision_id,
            reason=pb.reason,
        )
        self._apply(pb.scope, pb.value, entry)

    def remove(self, pb: Any) -> None:
        self._apply(pb.scope, pb.value, None)

    def _apply(self, scope: int, value: str, entry: Entry | None) -> None:
        if scope == _SCOPE_IP:
            ip = canonical_ip(value)
            if ip is not None:
                _set(self.ips, ip, entry)
        elif scope == _SCOPE_ACTOR:
            _set(self.actors, value, entry)
        elif scope == _SCOPE_CIDR:
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                return
            bucket_key = (net.version, net.prefixlen)
            bucket = self.ranges.setdefault(bucket_key, {})
            _set(bucket, int(net.network_address), entry)
            if not bucket:
                del self.ranges[bucket_key]

    def ip_dimension(self, ip: IpAddr, now: float) -> tuple[Entry, str] | None:
        ban: tuple[Entry, str] | None = None
        e = self.ips.get(ip)
        if e is not None and e.expires_at > now:
            if e.type == _ALLOW:
                return e, "ip"
            if e.type == _BAN:
                ban = (e, "ip")
        if self.ranges:
            bits = int(ip)
            width = 32 if ip.version == 4 else 128
            # A copy: the watcher thread may add a bucket meanwhile.
            for (version, prefix), bucket in tuple(self.ranges.items()):
                if version != ip.version:
                    continue
                net = bits >> (width - prefix) << (width - prefix) if prefix else 0
                e = bucket.get(net)
                if e is not None and e.expires_at > now:
                    if e.type == _ALLOW:
                        return e, "cidr"
                    if e.type == _BAN and ban is None:
                        ban = (e, "cidr")
        return ban

    def __len__(self) -> int:
        return len(self.ips) + len(self.actors) + sum(len(b) for b in self.ranges.values())


def _set(d: dict[Any, Entry], key: Any, entry: Entry | None) -> None:
    if entry is None:
        d.pop(key, None)
    else:
        d[key] = entry


class DecisionCache:
    """The tenant's effective decisions, followed live (one thread per process)."""

    def __init__(
        self,
        client: TelemetryClient,
        failure_mode: str = "last_known",
        heartbeat_interval_s: int = 5,
    ) -> None:
        if failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be one of {FAILURE_MODES}, not {failure_mode!r}")
        self._client = client
        self.failure_mode = failure_mode
        self.heartbeat_interval_s = heartbeat_interval_s
        self._state = _State()
        self._revision = 0
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = False
        self._last_heard = 0.0
        self._synced_event = threading.Event()

    def _reset_after_fork(self) -> None:
        # Keep the inherited copy (valid for last_known) and its revision so
        # the child resumes from it; the stream and thread are the parent's.
        self._init_process_state()

    def _ensure_started(self) -> None:
        if self._pid != os.getpid():
            self._reset_after_fork()
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(
                        target=self._run, name="picket-decisions", daemon=True
                    )
                    self._thread.start()

    def start(self) -> DecisionCache:
        self._ensure_started()
        return self

    def wait_synced(self, timeout_s: float) -> bool:
        """Waits until the first snapshot is applied; whether it was in time."""
        self._ensure_started()
        return self._synced_event.wait(timeout_s)

    @property
    def in_sync(self) -> bool:
        return self._synced and (
            time.monotonic() - self._last_heard < 3 * self.heartbeat_interval_s
        )

    @property
    def revision(self) -> int:
        return self._revision

    def __len__(self) -> int:
        return len(self._state)

    def check(self, ip: str | IpAddr | None = None, actor: str | None = None) -> Verdict:
        """Whether a request from ``ip`` by ``actor`` may proceed."""
        self._ensure_started()
        if not self.in_sync:
            if self.failure_mode == "fail_open":
                return ALLOW
            if self.failure_mode == "fail_closed":
                return Verdict(False, "unavailable")
        state = self._state
        now = time.time()
        ban: tuple[Entry, str] | None = None
        if ip is not None and (state.ips or state.ranges):
            addr = canonical_ip(ip) if isinstance(ip, str) else ip
            if addr is not None:
                found = state.ip_dimension(addr, now)
                if found is not None and found[0].type == _BAN:
                    ban = found
        if ban is None and actor and state.actors:
            e = state.actors.get(actor)
            if e is not None and e.expires_at > now and e.type == _BAN:
                ban = (e, "actor")
        if ban is None:
            return ALLOW
        return Verdict(False, ban[1], ban[0].decision_id)

    def close(self) -> None:
        self._stop.set()

    # -- the watcher thread ------------------------------------------------

    def _run(self) -> None:
        from picket.v1 import enforcement_pb2

        channel = self._client.new_channel()
        backoff = 0.2
        try:
            while not self._stop.is_set():
                try:
                    self._follow(channel, enforcement_pb2)
                    backoff = 0.2  # a clean end (server shutdown): reconnect now
                except RpcError as e:
                    log.info("picket: decision stream: %s; reconnecting in %.1f s", e, backoff)
                    self._stop.wait(random.uniform(backoff / 2, backoff))
                    backoff = min(5.0, backoff * 2)
                except Exception:
                    log.exception("picket: decision stream failed")
                    self._stop.wait(backoff)
                    backoff = min(5.0, backoff * 2)
        finally:
            channel.close()

    def _follow(self, channel: Any, pb: Any) -> None:
        request = pb.WatchDecisionsRequest(
            after_revision=self._revision, heartbeat_interval_seconds=self.heartbeat_interval_s
        )
        snapshot: list[Any] = []
        stream = channel.server_stream(
            _WATCH, request, pb.WatchDecisionsResponse, read_timeout_s=3 * self.heartbeat_interval_s
        )
        for msg in stream:
            if self._stop.is_set():
                return
            self._last_heard = time.monotonic()
            item = msg.WhichOneof("item")
            if item == "snapshot":
                snapshot.extend(msg.snapshot.decisions)
            elif item == "snapshot_complete":
                state = _State()
                for d in snapshot:
                    state.put(d)
                snapshot = []
                self._state = state  # one reference swap: readers see old or new
                self._revision = msg.snapshot_complete.revision
                self._mark_synced()
            elif item == "deltas":
                for delta in msg.deltas.deltas:
                    if delta.kind in (_ADDED, _UPDATED):
                        self._state.put(delta.decision)
                    elif delta.kind in (_REMOVED, _EXPIRED):
                        self._state.remove(delta.decision)
                self._revision = msg.deltas.revision
                self._mark_synced()
            elif item == "heartbeat":
                self._revision = max(self._revision, msg.heartbeat.revision)
                self._mark_synced()

    def _mark_synced(self) -> None:
        if not self._synced:
            self._synced = True
            self._synced_event.set()
