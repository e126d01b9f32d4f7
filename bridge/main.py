"""The bridge process: pool, broker reconcile, MQTT ingest, and beside the ingest the tasks it
owns (retained janitor, alert-rule sweep, alert outbox, config restore after the broker lost its
state); opened in order, closed in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import asyncpg
from prometheus_client import start_http_server

from bridge.decode import TelemetryDecoder
from bridge.metrics import BridgeMetrics
from bridge.notify import Notifier
from bridge.outbox import AlertOutbox
from bridge.restore import ConfigRestorer
from bridge.retained import RetainedJanitor
from bridge.rules import RuleEngine, RuleSweeper
from bridge.store import Store
from bridge.subscribe import Ingest
from lms_core import db, migrations
from lms_core.errors import BrokerUnavailable, DatabaseUnavailable, LmsError, MigrationError
from lms_core.provisioning import Provisioner
from lms_core.settings import Settings
from lms_core.topics import TopicScheme

log = logging.getLogger("lms.bridge")
T = TypeVar("T")


async def _retry(what: str, fn: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Retry a startup step while its service is not there yet, up to ``timeout`` s.
    ``fn`` must make whatever it needs afresh on each call: a connection object whose
    first attempt failed is never tried again (clients and pools are single-use)."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return await fn()
        except (DatabaseUnavailable, BrokerUnavailable) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s not ready (%s); retrying", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)


async def _open(stack: contextlib.AsyncExitStack, what: str, factory: Callable[[], AbstractAsyncContextManager[T]],
                timeout: float) -> T:
    """Enter a new context manager from ``factory`` on ``stack``, retrying with a new one
    while ``what`` is not there yet."""
    return await _retry(what, lambda: stack.enter_async_context(factory()), timeout)


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a task group stopped on, so that callers (and the CLI's one-line
    messages) see our own error types, not a group of them."""
    first = group.exceptions[0]
    return _unwrap(first) if isinstance(first, BaseExceptionGroup) else first


async def check_schema(pool: asyncpg.Pool) -> None:
    latest = migrations.load()[-1].version
    try:
        current = await pool.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        current = None
    if current is None or current < latest:
        raise MigrationError(
            f"the database schema is at {current or 0:04d}, the code needs {latest:04d}: run `lms migrate`"
        )


async def reconcile_broker(settings: Settings, pool: asyncpg.Pool) -> dict[str, int]:
    async with Provisioner.open(settings, pool) as prov:
        return await prov.reconcile()


async def run(settings: Settings, stop: asyncio.Event, *, startup_timeout: float = 30) -> None:
    """Run one bridge until ``stop`` is set; then flush, commit, acknowledge, disconnect.

    Opened in order - metrics server, pool, broker reconcile, ingest - and closed in
    reverse by one exit stack, whatever fails on the way.
    """
    metrics = BridgeMetrics()
    async with contextlib.AsyncExitStack() as stack:
        if settings.bridge.metrics_port:
            try:
                server, _thread = start_http_server(settings.bridge.metrics_port, settings.bridge.metrics_host,
                                                    registry=metrics.registry)
            except OSError as exc:
                raise LmsError(f"cannot serve metrics on port {settings.bridge.metrics_port}: {exc}") from None
            stack.callback(server.shutdown)
        # Connections: the ingest's commits, the rule sweep, the alert outbox, one spare (the
        # config restore, rare).
        pool = await _open(stack, "PostgreSQL", lambda: db.create_pool(settings.database_url, min_size=1, max_size=6),
                           startup_timeout)
        await check_schema(pool)
        # The webhook sender's own connections: ingestion never waits for one of its (bridge/notify.py).
        notify_pool = await _open(stack, "PostgreSQL", lambda: db.create_pool(settings.database_url, min_size=0,
                                                                              max_size=2), startup_timeout)
        counts = await _retry("broker", lambda: reconcile_broker(settings, pool), startup_timeout)
        log.info("broker reconciled with the database: %s", counts)
        topics = TopicScheme(settings.topic_root)
        rules = RuleEngine(topics, metrics)
        if not settings.bridge.rollups:
            # Readings this bridge writes will be missing from them: the API must not use them.
            await pool.execute("UPDATE rollup_state SET complete_at = NULL")
            log.warning("LMS_BRIDGE_ROLLUPS=off: rollups marked incomplete until `lms rollups backfill`")
        store = Store(pool, TelemetryDecoder(settings.limits), topics, metrics, rules, rollups=settings.bridge.rollups)
        ingest = await _open(stack, "broker", lambda: Ingest(settings, store, metrics), startup_timeout)
        # Alert messages go out on the ingest's own connection (the platform account), right
        # after the commit that wrote them.
        outbox = AlertOutbox(pool, ingest.mqtt, metrics)
        rules.on_outbox = outbox.publish
        restorer = ConfigRestorer(settings, pool)
        ingest.on_state_lost = restorer.broker_lost_state
        notifier = Notifier(settings.alerts, notify_pool, metrics.registry)
        rules.on_deliveries = notifier.wake
        log.info("bridge %s ingesting", settings.bridge.client_id)
        try:
            # The tasks the bridge owns: one failing stops the others, and the group is
            # closed before the ingest and the pool (janitor, sweep, outbox and restore catch
            # their own errors and try again at their next round).
            async with asyncio.TaskGroup() as tasks:
                helpers = [
                    tasks.create_task(RetainedJanitor(settings, store, metrics).run(stop), name="retained janitor"),
                    tasks.create_task(RuleSweeper(pool, rules, metrics).run(stop), name="alert rule sweep"),
                    tasks.create_task(outbox.run(stop), name="alert outbox"),
                    tasks.create_task(restorer.run(stop), name="config restore"),
                ]
                # The webhook sender returns by itself once stop is set; cancelled at shutdown, a
                # request in flight is retried when its lease runs out (bridge/notify.py).
                helpers.append(tasks.create_task(notifier.run(stop), name="webhook sender"))
                try:
                    await ingest.run(stop)
                finally:
                    for task in helpers:
                        task.cancel()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    log.info("bridge stopped")
