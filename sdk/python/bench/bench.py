"""Python SDK benchmarks, against a real local Picket.

    python sdk/python/bench/bench.py --picket target/release/picket

Starts ``picket serve`` on a scratch SQLite store (or ``--database-url``),
creates a tenant and key, then measures in one run:

1. client throughput: events/s from one process through one TelemetryClient
   (enqueue until N, then close(): the time until every receipt is in), for
   batch sizes 100 (the default) and 1,000, and the caller's cost per
   ``enqueue_event``;
2. middleware overhead: a FastAPI app called through its ASGI interface in
   one process (no HTTP server: its cost is the same with and without the
   middleware and would only add noise), bare and wrapped, alternating
   request by request; per-request p50/p99 of each, and the difference. The wrapped app's
   client sends its events to Picket in the background meanwhile, as in
   production.

Needs ``pip install './sdk/python[test]'`` (FastAPI, the test helpers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import PicketServer, Tenant  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from picket import ActivityEvent, TelemetryClient  # noqa: E402
from picket.middleware import SecurityMonitoringMiddleware  # noqa: E402


def throughput(server: PicketServer, key: str, n: int, batch: int) -> dict[str, float]:
    client = TelemetryClient(
        api_key=key,
        endpoint=server.endpoint,
        service_name="bench",
        max_batch_size=batch,
        max_queue_size=n,
        flush_interval_s=0.05,
    )
    events = [
        ActivityEvent(
            event_type="user.login",
            actor=f"user-{i % 1000}",
            resource="/login",
            action="login",
            ip=f"10.0.{i % 250}.{i % 200 + 1}",
            extras={"i": i},
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    for e in events:
        client.enqueue_event(e)
    enqueued = time.perf_counter()
    stats = client.close(timeout_s=600)
    done = time.perf_counter()
    assert stats.accepted == n and stats.dropped_total == 0, stats
    return {
        "events_per_s": n / (done - start),
        "enqueue_us": (enqueued - start) / n * 1e6,
    }


def raw_ingest(server: PicketServer, key: str, n: int, batch: int) -> float:
    """The reference: the same events, encoded beforehand, sent by sequential
    Ingest calls on one connection with no SDK machinery (events/s)."""
    from picket.event import to_proto
    from picket.v1 import ingest_pb2

    channel = server.channel(key)
    requests = []
    for start in range(0, n, batch):
        events = [
            to_proto(
                ActivityEvent(
                    event_type="user.login",
                    actor=f"user-{i % 1000}",
                    resource="/login",
                    action="login",
                    ip=f"10.0.{i % 250}.{i % 200 + 1}",
                    extras={"i": i},
                ),
                f"raw-{batch}-{i}",
                "bench",
                "",
            )
            for i in range(start, min(n, start + batch))
        ]
        requests.append(ingest_pb2.IngestRequest(events=events).SerializeToString())
    t0 = time.perf_counter()
    for body in requests:
        r = channel.unary_encoded(
            "/picket.v1.IngestService/Ingest", body, ingest_pb2.IngestResponse, 60
        )
        assert r.accepted == len(r.receipts)
    took = time.perf_counter() - t0
    channel.close()
    return n / took


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    return app


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sent
        if message["type"] == "http.response.body" and not message.get("more_body"):
            sent = True

    await app(scope, receive, send)
    assert sent


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def overhead(server: PicketServer, key: str, rounds: int, per_round: int, enforce: bool) -> dict[str, float]:
    # The loop below serves requests back to back, faster than any real
    # single process: hold them all, so the figures are not about drops.
    client = TelemetryClient(
        api_key=key, endpoint=server.endpoint, service_name="bench", max_queue_size=1_000_000
    )
    bare = make_app()
    wrapped = SecurityMonitoringMiddleware(
        make_app(), client=client, trusted_proxies=["127.0.0.1"], enforce=enforce
    )
    if enforce:
        assert client.decisions().wait_synced(10)
    headers = [
        (b"host", b"bench"),
        (b"user-agent", b"bench/1.0"),
        (b"x-user-id", b"alice"),
        (b"x-forwarded-for", b"192.0.2.7"),
    ]
    times: dict[str, list[float]] = {"bare": [], "wrapped": []}
    for _ in range(200):  # warm up both
        await call(bare, "/items/1", headers)
        await call(wrapped, "/items/1", headers)
    # Interleaved request by request (alternating which goes first), so both
    # see the same machine: the figures are from the same moments.
    pair = [("bare", bare), ("wrapped", wrapped)]
    for i in range(rounds * per_round):
        for name, app in pair if i % 2 else reversed(pair):
            t0 = time.perf_counter_ns()
            await call(app, f"/items/{i}", headers)
            times[name].append((time.perf_counter_ns() - t0) / 1000)
    stats = client.close(timeout_s=60)
    assert stats.dropped_total == 0, stats
    out = {}
    for name, xs in times.items():
        out[f"{name}_p50_us"] = statistics.median(xs)
        out[f"{name}_p99_us"] = pct(xs, 0.99)
    out["overhead_p50_us"] = out["wrapped_p50_us"] - out["bare_p50_us"]
    out["overhead_p99_us"] = out["wrapped_p99_us"] - out["bare_p99_us"]
    out["requests"] = len(times["wrapped"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--picket", required=True, help="the picket binary")
    ap.add_argument("--database-url", default="", help="store (default: scratch SQLite)")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=2_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        url = args.database_url or f"sqlite://{scratch}/picket.db"
        server = PicketServer(args.picket, url)
        server.start()
        try:
            tenant = Tenant(server, f"bench-{os.getpid()}")
            print(f"load: {os.getloadavg()}")
            for batch in (100, 1000):
                r = throughput(server, tenant.key, args.events, batch)
                raw = raw_ingest(server, tenant.key, args.events, batch)
                print(
                    f"client throughput, batch {batch}: {r['events_per_s']:,.0f} events/s "
                    f"({args.events:,} events; enqueue_event {r['enqueue_us']:.2f} us each); "
                    f"reference (pre-encoded sequential Ingest calls): {raw:,.0f} events/s; "
                    f"ratio {r['events_per_s'] / raw:.2f}"
                )
            for enforce in (False, True):
                o = asyncio.run(overhead(server, tenant.key, args.rounds, args.per_round, enforce))
                label = "middleware + enforcement" if enforce else "middleware"
                print(
                    f"{label}: bare p50 {o['bare_p50_us']:.1f} us p99 {o['bare_p99_us']:.1f} us; "
                    f"wrapped p50 {o['wrapped_p50_us']:.1f} us p99 {o['wrapped_p99_us']:.1f} us; "
                    f"overhead p50 {o['overhead_p50_us']:.1f} us p99 {o['overhead_p99_us']:.1f} us "
                    f"({o['requests']:,} requests each)"
                )
            print(f"load: {os.getloadavg()}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
