"""/api/v1/orgs/{org}: readings, aggregates, latest values, events, exports and the
quarantine (the queries are in api/services/data.py). An export streams, and a reader that
takes nothing for a while is cut off here."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import Message, Receive, Scope, Send

from api.access import Access
from api.deps import BIGINT_MAX, AppSettings
from api.services.data import Bucket, DataService, EventPage, Export, QuarantinePage, Reading, ReadingPage

log = logging.getLogger("lms.api")

Data = NamedDependency[DataService]

Metrics = Annotated[list[str] | None, QueryParameter(name="metric", description="repeat for several", max_items=50)]
Start = Annotated[datetime | None, QueryParameter(name="from", description="RFC 3339; default: 24 h before 'to'")]
End = Annotated[datetime | None, QueryParameter(name="to", description="RFC 3339, exclusive; default: now")]
Limit = Annotated[int, QueryParameter(ge=1, le=10_000)]

class DataController(Controller):
    path = "/"
    tags = ["data"]

    @get("/devices/{device:str}/readings", opt={"perm": "data.read"})
    async def readings(self, access: Access, data_service: Data, device: FromPath[str], metric: Metrics = None,
                       start: Start = None, end: End = None, limit: Limit = 1000,
                       cursor: Annotated[str | None, QueryParameter(max_length=500)] = None) -> ReadingPage:
        """Raw readings in time order (then metric); pass ``next`` back as ``cursor`` for more."""
        return await data_service.readings(access, device, metric, start, end, limit, cursor)

    @get("/devices/{device:str}/readings/aggregate", opt={"perm": "data.read"})
    async def aggregate(self, access: Access, data_service: Data, device: FromPath[str], metric: Metrics = None,
                        start: Start = None, end: End = None,
                        bucket: Annotated[str, QueryParameter(description="1s .. 1d, e.g. 5m")] = "5m",
                        fn: Annotated[list[str] | None, QueryParameter(
                            description="avg, min, max, count, last (repeat); default all")] = None) -> list[Bucket]:
        """Per bucket and metric: avg, min, max, count and last value (``date_bin``)."""
        return await data_service.aggregate(access, device, metric, start, end, bucket, fn)

    @get("/devices/{device:str}/latest", opt={"perm": "data.read"})
    async def latest(self, access: Access, data_service: Data, device: FromPath[str]) -> list[Reading]:
        """The newest reading of each metric of the device."""
        return await data_service.latest(access, device)

    @get("/devices/{device:str}/events", opt={"perm": "data.read"})
    async def events(self, access: Access, data_service: Data, device: FromPath[str],
                     type: Annotated[str | None, QueryParameter(max_length=64)] = None,
                     start: Start = None, end: End = None, limit: Limit = 1000,
                     cursor: Annotated[str | None, QueryParameter(max_length=500)] = None) -> EventPage:
        """Events in time order; pass ``next`` back as ``cursor`` for more."""
        return await data_service.events(access, device, type, start, end, limit, cursor)

    @get("/devices/{device:str}/export", opt={"perm": "data.read"})
    async def export(self, access: Access, data_service: Data, settings: AppSettings, device: FromPath[str],
                     metric: Metrics = None, start: Start = None, end: End = None,
                     format: Annotated[str, QueryParameter(pattern="^(csv|json)$")] = "csv") -> Stream:
        """All readings of the range, streamed as CSV or JSON lines (never held in memory).

        At most a few exports stream at once per user and per API process; beyond that the
        answer is 429 with Retry-After. A reader that takes nothing for a while is cut off."""
        export = await data_service.export(access, device, metric, start, end, format)
        media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
        name = f"{access.slug}-{device}.{'csv' if format == 'csv' else 'jsonl'}"
        return _ExportStream(export, settings.api.export_stall_s, settings.api.export_max_s, media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @get("/quarantine", opt={"perm": "quarantine.read"})
    async def quarantine(
        self, access: Access, data_service: Data, limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        before: Annotated[int | None, QueryParameter(ge=1, le=BIGINT_MAX, description="id to continue below")] = None,
    ) -> QuarantinePage:
        """What the bridge refused for this organization, newest first, and why."""
        return await data_service.quarantine(access, limit, before)


class _Stalled(Exception):
    """The client took nothing for the stall time."""


class _Overdue(Exception):
    """The export was still streaming at its deadline."""


class _ExportStream(Stream):
    """A Stream that owns its :class:`~api.services.data.Export`: it closes it however the response ends, and
    cuts off a client that takes nothing for ``stall_s`` seconds, or is still being sent to
    ``max_s`` seconds after it started (a steady trickle is never stalled, and would hold the
    slot, the connection and the open transaction for as long as its reader liked)."""

    def __init__(self, export: Export, stall_s: float, max_s: float, **kwargs: Any) -> None:
        super().__init__(export.chunks(), **kwargs)
        self._export = export
        self._stall_s = stall_s
        self._max_s = max_s

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        return _Guarded(super().to_asgi_response(*args, **kwargs), self._export,  # type: ignore[return-value]
                        self._stall_s, self._max_s)


class _Guarded:
    """The ASGI side of :class:`_ExportStream` (Litestar only calls what it is given)."""

    def __init__(self, inner: ASGIResponse, export: Export, stall_s: float, max_s: float) -> None:
        self.inner, self.export, self.stall_s, self.max_s = inner, export, stall_s, max_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = asyncio.get_running_loop().time() + self.max_s

        async def guarded_send(message: Message) -> None:
            # The server's send waits while the client's socket is full: a reader that
            # stops reading stops us here, and so does one that reads too slowly to be
            # done by the deadline. Every chunk is sent through here, so the deadline is
            # seen within one fetch (which PostgreSQL's statement_timeout bounds) of passing.
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise _Overdue
            try:
                await asyncio.wait_for(send(message), min(self.stall_s, left))
            except TimeoutError:
                raise (_Stalled if left > self.stall_s else _Overdue) from None

        state = scope.get("state", {})
        try:
            await self.inner(scope, receive, guarded_send)
        except* _Stalled:
            log.warning("export cut off: the client took nothing for %s s", self.stall_s,
                        extra={"request_id": state.get("request_id", "")})
            self._abort(state)
        except* _Overdue:
            log.warning("export cut off: still streaming after %s s (LMS_API_EXPORT_MAX_SECONDS)", self.max_s,
                        extra={"request_id": state.get("request_id", "")})
            self._abort(state)
        finally:
            await self.export.close()

    @staticmethod
    def _abort(state: dict[str, Any]) -> None:
        abort = state.get("abort_connection")
        if abort is not None:
            abort()
