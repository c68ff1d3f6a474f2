"""The client's delivery contract against the real server: drop accounting
by reason, REJECTED receipts, close() within its deadline, and fork."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from conftest import PicketServer, Tenant, free_port, wait_for
from picket import ActivityEvent, TelemetryClient


def event(i: int, **over: Any) -> ActivityEvent:
    fields: dict[str, Any] = dict(
        event_type="user.login",
        actor=f"user-{i}",
        resource=f"e-{i}",
        action="login",
        ip="192.0.2.10",
        user_agent="pytest",
        extras={"n": i, "tag": "sdk"},
        outcome="success",
    )
    fields.update(over)
    return ActivityEvent(**fields)


def test_events_are_mapped_and_stored(tenant: Tenant, running_server: PicketServer) -> None:
    client = TelemetryClient(
        api_key=tenant.key, endpoint=running_server.endpoint, service_name="billing", environment="prod"
    )
    assert client.enqueue_event(event(1, idempotency_key="fixed-key-1", service_name="auth"))
    assert client.enqueue_event(event_type="Config Change", actor="svc:deploy", resource="e-2")
    stats = client.close()
    assert stats.accepted == 2 and stats.dropped_total == 0
    got = {e.resource: e for e in tenant.events()}
    login = got["e-1"]
    assert login.event_type == "user.login" and login.ocsf_class_uid == 3002
    assert login.idempotency_key == "fixed-key-1"
    assert login.service == "auth" and login.environment == "prod"
    assert login.source_ip == "192.0.2.10" and login.source_system == "picket-sdk-python"
    assert login.attributes["n"] == "1" and login.attributes["user_agent"] == "pytest"
    assert login.outcome == 1
    change = got["e-2"]
    assert change.event_type == "config_change", "normalized to Picket's event type rule"
    assert change.service == "billing"


def test_queue_full_drops_the_newest_and_counts_them(
    tenant: Tenant, running_server: PicketServer
) -> None:
    dropped: list[tuple[str, int]] = []
    client = TelemetryClient(
        api_key=tenant.key,
        endpoint=running_server.endpoint,
        flush_interval_s=3600,  # nothing leaves before close(): the count is exact
        max_queue_size=10,
        on_drop=lambda reason, events: dropped.append((reason, len(events))),
    )
    queued = [client.enqueue_event(event(i)) for i in range(50)]
    assert queued == [True] * 10 + [False] * 40
    stats = client.stats()
    assert stats.dropped["queue_full"] == 40 and stats.buffered == 10
    assert dropped == [("queue_full", 1)] * 40
    final = client.close()
    assert final.accepted == 10
    assert final.dropped == {"queue_full": 40, "rejected": 0, "retries_exhausted": 0, "shutdown_deadline": 0}
    assert sorted(e.resource for e in tenant.events()) == sorted(f"e-{i}" for i in range(10))


def test_rejected_events_are_reported_and_not_retried(
    tenant: Tenant, running_server: PicketServer
) -> None:
    rejected: list[tuple[str, str, str]] = []
    client = TelemetryClient(
        api_key=tenant.key,
        endpoint=running_server.endpoint,
        on_rejected=lambda ev, path, reason: rejected.append((ev.resource or "", path, reason)),
    )
    client.enqueue_event(event(1))
    client.enqueue_event(event(2, ip="not-an-ip"))
    client.enqueue_event(event(3))
    stats = client.close()
    assert stats.accepted == 2 and stats.dropped["rejected"] == 1 and stats.retries == 0
    assert [(r, p) for r, p, _ in rejected] == [("e-2", "source_ip")]
    assert sorted(e.resource for e in tenant.events()) == ["e-1", "e-3"]


def test_close_flushes_within_its_deadline(tenant: Tenant, running_server: PicketServer) -> None:
    client = TelemetryClient(api_key=tenant.key, endpoint=running_server.endpoint, flush_interval_s=3600)
    for i in range(2500):
        client.enqueue_event(event(i))
    started = time.monotonic()
    stats = client.close(timeout_s=20)
    assert time.monotonic() - started < 20
    assert stats.accepted == 2500 and stats.dropped_total == 0 and stats.buffered == 0
    assert len(tenant.events()) == 2500


def test_close_reports_what_it_could_not_send() -> None:
    lost: list[tuple[str, int]] = []
    client = TelemetryClient(
        api_key="pk_nobody_listens",
        endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        max_retry_attempts=100,
        on_drop=lambda reason, events: lost.append((reason, len(events))),
    )
    for i in range(30):
        client.enqueue_event(event(i))
    started = time.monotonic()
    stats = client.close(timeout_s=1.0)
    took = time.monotonic() - started
    assert took < 2.0, f"close took {took:.2f} s for a 1 s deadline"
    assert stats.accepted == 0 and stats.dropped["shutdown_deadline"] == 30
    assert stats.retries >= 1
    assert sum(n for reason, n in lost if reason == "shutdown_deadline") == 30
    assert not client.enqueue_event(event(99)), "a closed client takes nothing"


def test_retries_exhausted_are_counted() -> None:
    client = TelemetryClient(
        api_key="pk_nobody_listens",
        endpoint=f"http://127.0.0.1:{free_port()}",
        max_retry_attempts=2,
        retry_initial_backoff_s=0.05,
        flush_interval_s=0.05,
    )
    for i in range(5):
        client.enqueue_event(event(i))
    wait_for("retries exhausted", lambda: client.stats().dropped["retries_exhausted"] == 5, 10)
    stats = client.close(timeout_s=0.5)
    assert stats.retries == 2 and stats.dropped["shutdown_deadline"] == 0


def _child(client: TelemetryClient, out: Any) -> None:
    # Runs in a forked child: its own events, through a fresh sender.
    before = client.stats()
    for i in range(100, 150):
        client.enqueue_event(event(i))
    after = client.close(timeout_s=20)
    out.put((os.getpid(), before, after))


def test_fork_makes_a_fresh_sender_in_the_child(tenant: Tenant, running_server: PicketServer) -> None:
    client = TelemetryClient(api_key=tenant.key, endpoint=running_server.endpoint, flush_interval_s=0.05)
    for i in range(50):  # the sender thread and its connection exist before the fork
        client.enqueue_event(event(i))
    assert client.flush(20)
    for i in range(50, 100):  # queued, unsent, at the fork: the parent's to send
        client.enqueue_event(event(i))
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    children = [ctx.Process(target=_child, args=(client, out)) for _ in range(2)]
    for c in children:
        c.start()
    reports = [out.get(timeout=60) for _ in children]
    for c in children:
        c.join(30)
        assert c.exitcode == 0
    for pid, before, after in reports:
        assert before.enqueued == 0 and before.buffered == 0, "the child inherits no queue"
        assert after.enqueued == 50 and after.accepted == 50, (pid, after)
        assert after.duplicates == 0, "the child resent its parent's events"
        assert after.dropped_total == 0
    for i in range(150, 160):
        client.enqueue_event(event(i))
    parent = client.close(timeout_s=20)
    assert parent.accepted == 110 and parent.duplicates == 0 and parent.dropped_total == 0
    resources = [e.resource for e in tenant.events()]
    # 100 parent events + 50 from each child (the children reuse resource names e-100..149).
    assert len(resources) == 210
    assert sorted(set(resources)) == sorted(f"e-{i}" for i in range(160))


def test_events_trickling_in_leave_on_the_flush_interval(
    tenant: Tenant, running_server: PicketServer
) -> None:
    client = TelemetryClient(api_key=tenant.key, endpoint=running_server.endpoint, flush_interval_s=0.1)
    for i in range(3):  # one at a time, each after the sender went idle
        client.enqueue_event(event(i))
        wait_for(f"event {i} sent", lambda: client.stats().accepted == i + 1, 10, every_s=0.02)
    client.close()


def test_a_batch_over_the_message_limit_is_split(picket_server: PicketServer, tmp_path: Any) -> None:
    small = PicketServer(picket_server.binary, "sqlite://" + str(tmp_path / "small.db"))
    small.start_env = {"PICKET_MAX_MESSAGE_BYTES": str(64 * 1024)}
    small.start()
    try:
        tenant = Tenant(small, "split")
        client = TelemetryClient(api_key=tenant.key, endpoint=small.endpoint, flush_interval_s=3600)
        for i in range(100):  # about 200 KiB in one batch: over the 64 KiB limit
            client.enqueue_event(event(i, extras={"blob": "b" * 2000}))
        stats = client.close(timeout_s=30)
        assert stats.accepted == 100 and stats.dropped_total == 0, stats
        # One request could not carry them: the batch was split. (The
        # server may also reset the connection on the oversized body, which
        # the client retries as UNAVAILABLE before it sees the status.)
        assert len(tenant.events(page_size=10)) == 100  # pages under the limit too
    finally:
        small.stop()


def test_enqueue_never_raises_into_the_caller() -> None:
    client = TelemetryClient(api_key="pk_x", endpoint=f"http://127.0.0.1:{free_port()}", flush_interval_s=3600)
    assert client.enqueue_event(no_such_field=1) is False  # type: ignore[call-arg]
    assert client.stats().dropped["rejected"] == 1
    client.close(timeout_s=0.1)
