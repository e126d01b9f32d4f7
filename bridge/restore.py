"""After the broker lost its state while the bridge runs: the retained desired configurations.

A device reads its desired configuration from the retained message on its ``config`` topic
when it connects. Reconcile (lms_core/provisioning.py) publishes them all again, but it runs
when a bridge starts; a broker restarted without its persistence file while the bridge runs
comes back without them, and a device connecting then would get no configuration until the
next bridge start or API change.

The bridge learns it on its reconnection: its session is persistent, so a broker that answers
``session_present`` false has kept nothing of it (its retained messages neither). The ingest
then calls :meth:`ConfigRestorer.broker_lost_state`, and this task of the bridge publishes the
configurations again (:meth:`Provisioner.restore_config`) on a connection and a database
connection of its own: the ingest does not wait for it. A failed restore is tried again with
backoff until it succeeds; a loss signalled while one runs starts another after it.

Only the configuration: device logins and roles live in the broker's dynamic-security file,
a file of its own that a lost persistence file leaves in place (a broker that lost that too
needs a reconcile: ``lms reconcile`` or a bridge restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from lms_core.db import translate
from lms_core.errors import BrokerError, DatabaseUnavailable
from lms_core.provisioning import Provisioner
from lms_core.settings import Settings

log = logging.getLogger("lms.bridge.restore")

#: First wait before trying a failed restore again; doubled per failure up to RETRY_MAX_S.
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0


class ConfigRestorer:
    """Publishes the retained desired configurations again when the broker lost its state."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self._lost = asyncio.Event()

    def broker_lost_state(self) -> None:
        """The bridge reconnected and the broker had no session for it (event loop thread)."""
        self._lost.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Restore after each loss until ``stop``; never raises for the broker's or the
        database's sake (the ingest must not stop over it)."""
        delay = RETRY_MIN_S
        while await self._until_lost(stop):
            self._lost.clear()
            try:
                restored, cleared = await self.restore()
            except (BrokerError, DatabaseUnavailable) as exc:
                log.warning("desired configuration not restored yet (%s); retrying in %.0f s", exc, delay)
            except Exception:
                log.exception("desired configuration not restored; retrying in %.0f s", delay)
            else:
                log.info("desired configuration restored after the broker lost its state",
                         extra={"config_restored": restored, "config_cleared": cleared})
                delay = RETRY_MIN_S
                continue
            self._lost.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def restore(self) -> tuple[int, int]:
        """One restore: (configurations published, cleared)."""
        try:
            async with Provisioner.open(self.settings, self.pool) as prov:
                return await prov.restore_config()
        except BrokerError:
            raise
        except Exception as exc:
            raise translate(exc) from exc

    async def _until_lost(self, stop: asyncio.Event) -> bool:
        """Wait for a loss (True) or for ``stop`` (False)."""
        waits = [asyncio.ensure_future(self._lost.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return not stop.is_set()
