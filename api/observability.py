"""Request ids, JSON access logs, /health, /ready and /metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import time
import uuid
from typing import Any

from litestar import Request, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("lms.api.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lms_api_requests", "HTTP requests", ["method", "status"], registry=r)
        self.latency = Histogram("lms_api_request_seconds", "HTTP request latency", ["method"], registry=r)
        # WebSocket streams (api/stream/)
        self.ws_clients = Gauge("lms_api_ws_clients", "WebSocket stream clients connected", registry=r)
        self.ws_frames = Counter("lms_api_ws_frames", "message frames queued to stream clients", registry=r)
        self.ws_dropped = Counter("lms_api_ws_frames_dropped", "frames dropped for clients with ?overflow=drop",
                                  registry=r)
        self.ws_slow = Counter("lms_api_ws_slow_disconnects", "stream clients disconnected as too slow", registry=r)
        self.ws_broker_filters = Gauge("lms_api_ws_broker_filters", "broker subscriptions the stream relay holds",
                                       registry=r)
        self.ws_broker_connected = Gauge("lms_api_ws_broker_connected", "the stream relay's broker connection is up",
                                         registry=r)


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Give every request an id (the caller's ``X-Request-ID`` if sane), return it as a
    header, log one JSON line per request."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            metrics: ApiMetrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                metrics.requests.labels(scope["method"], str(status)).inc()
                metrics.latency.labels(scope["method"]).observe(elapsed)
            log.info("request", extra={"request_id": rid, "method": scope["method"], "path": scope["path"],
                                       "status": status, "ms": round(elapsed * 1000, 1)})

    return middleware


def connection_aborter(send: Send) -> Any:
    """A way to drop a request's connection at once, or None; ``send`` is the server's own.

    ASGI cannot abort a connection: an app that gives up on a response lets the server close
    it gracefully, which waits for a client that never reads. uvicorn (what ``lms api`` runs)
    keeps the connection's asyncio transport on the object its ``send`` is bound to; a
    stalled export is cut off through it (api/data.py)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not callable(getattr(transport, "abort", None)):
        return None

    def abort() -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Closing a socket with unsent data leaves the kernel delivering it (and the
            # buffers held) for minutes; a zero linger time makes the close a reset.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    return abort


@get("/health", include_in_schema=False, sync_to_thread=False, opt={"exclude_from_auth": True})
def health() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@get("/ready", include_in_schema=False, opt={"exclude_from_auth": True})
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Ready: the database answers a query and the broker accepts a TCP connection."""
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(state.pool.fetchval("SELECT 1"), 2)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {exc.__class__.__name__}"
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(state.settings.mqtt.host, state.settings.mqtt.port), 2)
        writer.close()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {exc.__class__.__name__}"
    ok = all(v == "ok" for v in checks.values())
    return Response({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@get("/metrics", include_in_schema=False, opt={"exclude_from_auth": True})
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
