"""The FastAPI application the SDK tests serve under uvicorn and gunicorn.

Configured from the environment: PICKET_ENDPOINT, PICKET_API_KEY,
PICKET_ENFORCE=1 for enforcement, PICKET_SEND_AT_IMPORT=1 to send an event
while the module is imported (before a pre-forking server forks).
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from picket import ActivityEvent, TelemetryClient
from picket.middleware import SecurityMonitoringMiddleware

client = TelemetryClient(
    api_key=os.environ["PICKET_API_KEY"],
    endpoint=os.environ["PICKET_ENDPOINT"],
    service_name="shop-api",
    environment="test",
    flush_interval_s=0.2,
    max_retry_attempts=12,
    retry_max_backoff_s=2.0,
)

if os.environ.get("PICKET_SEND_AT_IMPORT") == "1":
    client.enqueue_event(ActivityEvent(event_type="app.start", actor="boot", resource=f"pid-{os.getpid()}"))
    client.flush(10)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await asyncio.to_thread(client.close)


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/items/{item_id}")
async def item(item_id: str) -> dict[str, object]:
    return {"item": item_id, "pid": os.getpid()}


@app.post("/items")
async def create(request: Request) -> dict[str, int]:
    return {"received": len(await request.body())}


@app.get("/boom")
async def boom() -> None:
    raise RuntimeError("boom")


@app.get("/stream")
async def stream() -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"x" * 1000
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@app.get("/stream-broken")
async def stream_broken() -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"y" * 100
        raise ValueError("broken after the first chunk")

    return StreamingResponse(chunks(), media_type="application/octet-stream")


app.add_middleware(
    SecurityMonitoringMiddleware,
    client=client,
    exclude_paths=["/health"],
    trusted_proxies=["127.0.0.1"],
    enforce=os.environ.get("PICKET_ENFORCE") == "1",
)
