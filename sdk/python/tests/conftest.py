"""Test support: the real ``picket serve`` binary as a child process.

``PICKET_BIN`` names the binary (the Rust test harness passes the one cargo
just built); ``PICKET_TEST_DATABASE_URL`` the store (default: a SQLite file
in a scratch directory). One server serves the whole session; each test works
in its own tenant. Nothing here sleeps to wait for readiness: every wait polls
with a deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from picket._grpcweb import Channel, RpcError
from picket.v1 import admin_pb2, enforcement_pb2, ingest_pb2

OPERATOR_TOKEN = "python-sdk-test-operator-token-0123456789"
KEY_PEPPER = "python-sdk-test-pepper"
HERE = Path(__file__).resolve().parent
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 0.05) -> T:
    """Polls ``check`` until it returns something truthy; fails after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as e:  # the thing is not ready yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PicketServer:
    """``picket serve`` on a fixed port, stoppable and restartable on the same data."""

    def __init__(self, binary: str, database_url: str) -> None:
        self.binary = binary
        self.database_url = database_url
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        #: Extra environment for the server (its settings).
        self.start_env: dict[str, str] = {}

    def start(self, timeout_s: float = 60.0) -> None:
        env = dict(os.environ)
        env.update(
            PICKET_DATABASE_URL=self.database_url,
            PICKET_ADMIN_TOKEN=OPERATOR_TOKEN,
            PICKET_KEY_PEPPER=KEY_PEPPER,
            PICKET_LISTEN=f"127.0.0.1:{self.port}",
            PICKET_WATCH_POLL_MS="100",
        )
        env.update(self.start_env)
        proc = subprocess.Popen(
            [self.binary, "--log-format", "json", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.proc = proc
        serving = threading.Event()

        def drain() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.log.append(line.rstrip())
                if "picket serving" in line:
                    serving.set()
            serving.set()

        threading.Thread(target=drain, daemon=True).start()
        if not serving.wait(timeout_s) or proc.poll() is not None:
            raise AssertionError("picket did not start:\n" + "\n".join(self.log[-30:]))

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as an operator's restart would do."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def channel(self, key: str) -> Channel:
        return Channel(self.endpoint, key)


class Tenant:
    """A fresh tenant and an API key with every non-admin scope."""

    def __init__(self, server: PicketServer, name: str) -> None:
        admin = server.channel(OPERATOR_TOKEN)
        tenant = admin.unary(
            "/picket.v1.AdminService/CreateTenant",
            admin_pb2.CreateTenantRequest(name=name),
            admin_pb2.CreateTenantResponse,
            10,
        ).tenant
        key = admin.unary(
            "/picket.v1.AdminService/CreateApiKey",
            admin_pb2.CreateApiKeyRequest(
                tenant_id=tenant.id,
                name="sdk-test",
                scopes=[admin_pb2.SCOPE_INGEST, admin_pb2.SCOPE_READ, admin_pb2.SCOPE_RESPOND],
            ),
            admin_pb2.CreateApiKeyResponse,
            10,
        )
        admin.close()
        self.server = server
        self.id = tenant.id
        self.key = key.secret

    def events(self, page_size: int = 1000, **filter_fields: Any) -> list[Any]:
        """Every stored event of the tenant (all pages)."""
        ch = self.server.channel(self.key)
        try:
            out: list[Any] = []
            token = ""
            while True:
                page = ch.unary(
                    "/picket.v1.IngestService/QueryEvents",
                    ingest_pb2.QueryEventsRequest(
                        filter=ingest_pb2.EventFilter(**filter_fields),
                        page_size=page_size,
                        page_token=token,
                    ),
                    ingest_pb2.QueryEventsResponse,
                    30,
                )
                out.extend(page.events)
                token = page.next_page_token
                if not token:
                    return out
        finally:
            ch.close()

    def ban(self, scope: int, value: str, duration_s: int = 600) -> Any:
        ch = self.server.channel(self.key)
        try:
            return ch.unary(
                "/picket.v1.EnforcementService/CreateDecision",
                enforcement_pb2.CreateDecisionRequest(
                    decision=enforcement_pb2.NewDecision(
                        scope=scope,
                        value=value,
                        type=enforcement_pb2.DECISION_TYPE_BAN,
                        duration_seconds=duration_s,
                        reason="sdk test",
                    )
                ),
                enforcement_pb2.CreateDecisionResponse,
                10,
            )
        finally:
            ch.close()


@pytest.fixture(scope="session")
def picket_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PicketServer]:
    binary = os.environ.get("PICKET_BIN")
    if not binary or not Path(binary).is_file():
        pytest.fail(
            "PICKET_BIN must name the picket binary (cargo test runs these tests with it)",
            pytrace=False,
        )
    url = os.environ.get("PICKET_TEST_DATABASE_URL") or (
        "sqlite://" + str(tmp_path_factory.mktemp("picket") / "picket.db")
    )
    server = PicketServer(binary, url)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def running_server(picket_server: PicketServer) -> PicketServer:
    """The session server, started again if an earlier test left it stopped."""
    if picket_server.proc is None:
        picket_server.start()
    return picket_server


@pytest.fixture
def tenant(running_server: PicketServer, request: pytest.FixtureRequest) -> Tenant:
    name = "t" + request.node.name.lower().replace("_", "-")[:40] + "-" + secrets.token_hex(3)
    return Tenant(running_server, "".join(c for c in name if c.isalnum() or c == "-"))


class AppProcess:
    """A test application under a real server (uvicorn or gunicorn)."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log: list[str] = []
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PYTHONPATH"] = str(HERE / "apps") + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

        def drain() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line.rstrip())

        threading.Thread(target=drain, daemon=True).start()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        import httpx

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError("app exited:\n" + "\n".join(self.log[-40:]))
            return httpx.get(self.base + "/health", timeout=1).status_code == 200

        wait_for("the app answers /health", ready, timeout_s, every_s=0.1)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def uvicorn_app(module: str, env: dict[str, str], workers: int) -> AppProcess:
    port = free_port()
    return AppProcess(
        [
            sys.executable, "-m", "uvicorn", f"{module}:app",
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers),
            "--no-proxy-headers", "--no-access-log", "--timeout-graceful-shutdown", "20",
        ],
        env,
        port,
    )


def app_env(server: PicketServer, tenant: Tenant, **extra: str) -> dict[str, str]:
    env = {"PICKET_ENDPOINT": server.endpoint, "PICKET_API_KEY": tenant.key}
    env.update(extra)
    return env


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str)
