"""The decision cache: resume, local expiry while Picket is down, and the
three failure modes."""

from __future__ import annotations

import time

from conftest import PicketServer, Tenant, free_port, wait_for
from picket import TelemetryClient
from picket.v1 import enforcement_pb2 as pb


def test_decisions_expire_locally_while_disconnected(
    tenant: Tenant, running_server: PicketServer
) -> None:
    client = TelemetryClient(api_key=tenant.key, endpoint=running_server.endpoint)
    cache = client.decisions("last_known")
    assert cache.wait_synced(10)
    short = tenant.ban(pb.DECISION_SCOPE_IP, "203.0.113.70", duration_s=4)
    tenant.ban(pb.DECISION_SCOPE_CIDR, "2001:db8:70::/48", duration_s=600)
    wait_for("ban applied", lambda: not cache.check("203.0.113.70").allowed, 5, every_s=0.02)
    wait_for("range ban applied", lambda: not cache.check("2001:db8:70::5").allowed, 5, every_s=0.02)
    assert cache.check("::ffff:203.0.113.70").why == "ip", "IPv4-mapped form is the same address"
    assert cache.check("203.0.113.71").allowed

    running_server.stop()
    expires = short.decision.expires_at.seconds + short.decision.expires_at.nanos / 1e9
    assert time.time() < expires, "the ban expired before Picket was stopped"
    # Last known: still denied while down, until its own expiry time.
    assert not cache.check("203.0.113.70").allowed
    wait_for("local expiry", lambda: cache.check("203.0.113.70").allowed, 10, every_s=0.05)
    assert time.time() >= expires
    assert running_server.proc is None, "expired with Picket down, not by a delta"
    assert not cache.check("2001:db8:70::5").allowed, "the long ban is still known"

    running_server.start()
    revision = cache.revision
    tenant.ban(pb.DECISION_SCOPE_ACTOR, "eve")
    wait_for("resumed after restart", lambda: not cache.check(actor="eve").allowed, 15, every_s=0.05)
    assert cache.revision > revision
    assert not cache.check("2001:db8:70::5").allowed, "state kept across the resume"
    client.close()


def test_failure_modes_when_picket_is_unreachable() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    verdicts = {}
    for mode in ("fail_open", "fail_closed", "last_known"):
        client = TelemetryClient(api_key="pk_x", endpoint=nowhere)
        cache = client.decisions(mode)
        assert not cache.wait_synced(0.3)
        verdicts[mode] = cache.check("192.0.2.1", "alice").allowed
        client.close()
    assert verdicts == {"fail_open": True, "fail_closed": False, "last_known": True}
