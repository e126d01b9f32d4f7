"""``GET /api/v1/orgs/{org}/stream`` (WebSocket): live topic streams of one organization.

The protocol (README, "Live streams"): the client sends JSON text frames
``{"type": "subscribe" | "unsubscribe", "filter": "+/telemetry", "id": ...}`` and
``{"type": "ping"}``; the server sends ``welcome``, ``subscribed``, ``unsubscribed``,
``error`` (the request changed nothing), ``pong``, ``message`` (one per received MQTT
message, once per client however its filters overlap), ``gap`` (the relay lost the broker
for a span: refetch it over REST) and ``dropped`` (with ``?overflow=drop``: frames lost).

The organization guard ran before the upgrade (``data.read``). A cookie-authenticated
upgrade must come from the API's own origin or one of ``LMS_API_CORS_ORIGINS`` (another
site's page could otherwise open the stream with the user's cookie: cross-site WebSocket
hijacking). Token, key and membership are checked again on every subscribe and every
``LMS_API_WS_RECHECK_SECONDS``; when they no longer hold, the stream closes with a code
saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from typing import Any, Literal

import asyncpg
from litestar import Controller, WebSocket, websocket
from litestar.exceptions import NotAuthorizedException, NotFoundException, PermissionDeniedException
from litestar.params import FromQuery

from api.access import OrgAccess, resolve_access
from api.auth.backend import WS_PROTOCOL, authenticate
from api.stream.filters import FilterError, check_filter
from api.stream.relay import CLOSE_FORBIDDEN, CLOSE_LIMIT, CLOSE_SESSION_ENDED, Relay, StreamClient
from lms_core.errors import BrokerError, LmsError

log = logging.getLogger("lms.api.stream")

#: A client's request frame: larger is refused (a filter is at most 200 characters).
MAX_REQUEST_CHARS = 4096
#: Close codes of a connection that is already gone (nothing to send).
_GONE = (1000, 1001, 1006)


def origin_allowed(socket: WebSocket[Any, Any, Any], cors_origins: tuple[str, ...]) -> bool:
    origin = socket.headers.get("origin", "")
    if not origin:
        return False  # every browser sends one; a program authenticates with a token instead
    if origin in cors_origins:
        return True
    host = socket.headers.get("host", "")
    return bool(host) and urllib.parse.urlsplit(origin).netloc == host


def _request_id(value: Any) -> Any:
    """The client's ``id`` of a request, echoed in the answer when it is a short string or a number."""
    if isinstance(value, bool):
        return None
    if (isinstance(value, int) and abs(value) < 2**53) or (isinstance(value, str) and len(value) <= 64):
        return value
    return None


class StreamController(Controller):
    path = "/stream"
    tags = ["stream"]

    @websocket("/", opt={"perm": "data.read"})
    async def stream(self, socket: WebSocket[Any, Any, Any],
                     overflow: FromQuery[Literal["close", "drop"]] = "close") -> None:
        access: OrgAccess = socket.scope["state"]["org_access"]
        settings = socket.app.state.settings
        relay: Relay = socket.app.state.relay
        if socket.auth == "cookie" and not origin_allowed(socket, settings.api.cors_origins):
            log.warning("refused a cookie stream from origin %r", socket.headers.get("origin", "")[:200])
            await socket.close(code=CLOSE_FORBIDDEN, reason="this Origin may not use the session cookie")
            return
        offered = socket.scope.get("subprotocols") or []
        await socket.accept(subprotocols=WS_PROTOCOL if WS_PROTOCOL in offered else None)
        joined = relay.join(access.slug, access.principal.user_id, drop_oldest=overflow == "drop")
        if isinstance(joined, str):
            await self._close(socket, CLOSE_LIMIT, joined)
            return
        client = joined
        client.send_control({"type": "welcome", "org": access.slug, "protocol": 1, "queue": client.limit,
                             "overflow": overflow})
        try:
            async with asyncio.TaskGroup() as tasks:
                helpers = [tasks.create_task(self._read(socket, client, relay, access)),
                           tasks.create_task(self._write(socket, client)),
                           tasks.create_task(self._recheck(socket, client, access))]
                await client.ended.wait()
                for task in helpers:
                    task.cancel()
        finally:
            await relay.leave(client)
        if client.end_code not in _GONE:
            await self._close(socket, client.end_code or 1000, client.end_reason)

    @staticmethod
    async def _close(socket: WebSocket[Any, Any, Any], code: int, reason: str) -> None:
        # A client that reads nothing may never take the close frame: don't wait for it long.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await socket.close(code=code, reason=reason[:120])

    async def _read(self, socket: WebSocket[Any, Any, Any], client: StreamClient, relay: Relay,
                    access: OrgAccess) -> None:
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                client.end(1000, "closed by the client")
                return
            text = message.get("text")
            if not isinstance(text, str):
                client.send_control({"type": "error", "message": "frames are JSON text, not binary"})
                continue
            await self._handle(text, socket, client, relay, access)

    async def _handle(self, text: str, socket: WebSocket[Any, Any, Any], client: StreamClient, relay: Relay,
                      access: OrgAccess) -> None:
        def error(message: str, rid: Any = None) -> None:
            client.send_control({"type": "error", "message": message, **({"id": rid} if rid is not None else {})})

        if len(text) > MAX_REQUEST_CHARS:
            error(f"a request frame has at most {MAX_REQUEST_CHARS} characters")
            return
        try:
            request = json.loads(text)
        except (ValueError, RecursionError):
            error("not JSON: send {\"type\": \"subscribe\", \"filter\": \"+/telemetry\"}")
            return
        if not isinstance(request, dict):
            error("a request is a JSON object with a 'type'")
            return
        rid = _request_id(request.get("id"))
        kind = request.get("type")
        if kind == "ping":
            client.send_control({"type": "pong", **({"id": rid} if rid is not None else {})})
            return
        if kind not in ("subscribe", "unsubscribe"):
            error("unknown type: use subscribe, unsubscribe or ping", rid)
            return
        try:
            relative = check_filter(request.get("filter"))
        except FilterError as exc:
            error(str(exc), rid)
            return
        if kind == "unsubscribe":
            if await relay.unsubscribe(client, relative):
                client.send_control({"type": "unsubscribed", "filter": relative, "id": rid})
            else:
                error(f"not subscribed to {relative!r}", rid)
            return
        if not await self._still_allowed(socket, client, access):
            return
        try:
            await relay.subscribe(client, relative)
        except ValueError as exc:
            error(str(exc), rid)
            return
        except BrokerError as exc:
            log.warning("stream subscription failed: %s", exc)
            error("the broker is unavailable; try again", rid)
            return
        client.send_control({"type": "subscribed", "filter": relative, "id": rid})

    @staticmethod
    async def _write(socket: WebSocket[Any, Any, Any], client: StreamClient) -> None:
        try:
            while True:
                await client.ready.wait()
                client.ready.clear()
                while client.end_code is None:
                    if client.dropped:
                        count, client.dropped = client.dropped, 0
                        await socket.send_text(json.dumps({"type": "dropped", "count": count}))
                    frame = client.take()
                    if frame is None:
                        break
                    await socket.send_text(frame)
                if client.end_code is not None:
                    return
        except Exception as exc:  # the connection broke under a send
            log.debug("stream send failed: %s", exc)
            client.end(1006, "")

    async def _recheck(self, socket: WebSocket[Any, Any, Any], client: StreamClient, access: OrgAccess) -> None:
        period = socket.app.state.settings.api.ws_recheck_s
        while True:
            await asyncio.sleep(period)
            if not await self._still_allowed(socket, client, access):
                return

    @staticmethod
    async def _still_allowed(socket: WebSocket[Any, Any, Any], client: StreamClient, access: OrgAccess) -> bool:
        """Whether the token or key and the membership still hold; if not, end the stream."""
        try:
            principal, _via = await authenticate(socket)
            await resolve_access(socket.app.state.pool, principal, access.slug, "data.read")
        except NotAuthorizedException:
            client.end(CLOSE_SESSION_ENDED, "session ended: the token or API key was revoked or has expired")
            return False
        except (NotFoundException, PermissionDeniedException):
            client.end(CLOSE_FORBIDDEN, "no longer allowed to read this organization")
            return False
        except (LmsError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The database is away: keep streaming, check again later.
            log.warning("could not recheck a stream's access: %s", exc)
        return True

