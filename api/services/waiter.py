"""Waking requests that wait for a command's result (``?wait=``), whichever API process
took the request and wherever the bridge runs: the bridge sends ``NOTIFY lms_commands,
'<id>'`` in the transaction that records a device's reply (lms_core/commands.py), and one
listening connection per API process wakes the requests waiting on that id.

The notification only makes the answer quick. A waiter also reads the row once a second,
so a lost listening connection (PostgreSQL restarted) costs latency, never a wrong answer;
the connection is opened again on the next wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from lms_core.commands import NOTIFY_CHANNEL

log = logging.getLogger("lms.api.waiter")

#: How often a waiter reads the row even without a notification.
POLL_S = 1.0


class CommandWaiter:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._events: dict[int, set[asyncio.Event]] = {}

    async def _listen(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            try:
                conn = await asyncpg.connect(self.database_url, timeout=5)
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("cannot listen for command results (%s); waiting requests poll", exc)
                return
            self._conn = conn

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            command_id = int(payload)
        except ValueError:
            return
        for event in self._events.get(command_id, ()):
            event.set()

    @contextlib.asynccontextmanager
    async def watching(self, command_id: int) -> Any:
        """An event set whenever the bridge reports a change of ``command_id``; register
        before reading the row, so that no change slips between the read and the wait."""
        await self._listen()
        event = asyncio.Event()
        self._events.setdefault(command_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(command_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[command_id]

    @staticmethod
    async def sleep(event: asyncio.Event, seconds: float) -> None:
        """Until ``event`` is set or ``seconds`` (at most POLL_S) have passed; clears it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(seconds, POLL_S))):
                await event.wait()
        event.clear()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
            self._conn = None
