"""The API's composition root: settings in, a Litestar app out."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components

from api.access import check_routes, org_router
from api.alerts import AlertsController, DeviceAlertsController
from api.assets import AssetsController
from api.auth.backend import SECURITY_SCHEMES, authentication
from api.auth.routes import AuthController
from api.auth.service import AuthService, retention_sweeper
from api.commands import CommandGroupsController, CommandsController
from api.config import ConfigController
from api.data import DataController
from api.deps import SERVICES
from api.devices import DevicesController
from api.errors import HANDLERS
from api.inputs import input_guard_middleware
from api.keys import ApiKeysController
from api.observability import ApiMetrics, connection_aborter, health, metrics, ready, request_id_middleware
from api.orgs import OrgController, OrgsController
from api.rules import RulesController
from api.services.data import ExportSlots
from api.services.publisher import Publisher
from api.services.technicians import TechnicianService
from api.services.waiter import CommandWaiter
from api.stream.relay import Relay
from api.stream.routes import StreamController
from api.technicians import TechniciansController, expiry_sweeper
from api.web import dashboard, dashboard_files
from api.webhooks import WebhooksController
from lms_core import db
from lms_core.settings import Settings

MAX_BODY_BYTES = 1024 * 1024


def export_session_settings(settings: Settings) -> dict[str, str]:
    """Timeouts PostgreSQL itself enforces on the export pool's sessions, behind the API's own
    cut-offs (api/data.py): should this process hang or lose track of an export, its open
    transaction (which pins the xmin horizon) is still ended. Between two fetches an export
    waits on its reader for at most the stall time; no single fetch, nor the export, may
    take longer than the export's deadline. A margin keeps the API's cut-off the one that
    normally acts (with its log line and clean close)."""
    api = settings.api
    return {
        "application_name": "lms-api-export",
        "idle_in_transaction_session_timeout": str((api.export_stall_s + 30) * 1000),
        "statement_timeout": str((api.export_max_s + 30) * 1000),
    }


class _App(Litestar):
    """Litestar, also noting in each request's scope state how to abort its connection:
    only here is ``send`` still the server's own (Litestar wraps it further in)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["abort_connection"] = connection_aborter(send)
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> Litestar:
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with db.create_pool(settings.database_url, min_size=1, max_size=10) as pool, \
                db.create_pool(settings.database_url, min_size=0, max_size=settings.api.export_concurrency,
                               server_settings=export_session_settings(settings)) as export_pool:
            app.state.pool = pool
            app.state.export_pool = export_pool  # streamed exports only: see api/data.py
            app.state.auth = AuthService(pool, settings.api, settings.secret_key)
            app.state.publisher = Publisher(settings.mqtt)  # connects on first use
            app.state.command_waiter = CommandWaiter(settings.database_url)
            app.state.relay = Relay(settings, app.state.metrics)  # connects with its first stream
            sweeper = asyncio.create_task(expiry_sweeper(TechnicianService(pool, settings)),
                                          name="technician expiry sweep")
            retention = asyncio.create_task(retention_sweeper(app), name="retention sweep")
            # Everything loaded so far (modules, the app, its routes) lives as long as the
            # process: out of the collector's sight, a full collection - which a request
            # allocating thousands of objects, like a day of buckets, sets off now and then -
            # walks only what requests made (bench/api_queries.py: it was the p99 of such a
            # request, ~30 ms against a ~10 ms median).
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                for task in (retention, sweeper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await app.state.relay.close()
                await app.state.publisher.close()
                await app.state.command_waiter.close()

    app = _App(
        route_handlers=[AuthController, OrgsController,
                        org_router(OrgController, DevicesController, DataController, TechniciansController,
                                   ApiKeysController, AssetsController, CommandsController, CommandGroupsController,
                                   ConfigController, StreamController, RulesController, AlertsController,
                                   DeviceAlertsController, WebhooksController),
                        health, ready, metrics, dashboard, dashboard_files()],
        lifespan=[lifespan],
        dependencies=SERVICES,
        # Outermost first: the request id, refusing unstorable input, then who is calling.
        middleware=[request_id_middleware, input_guard_middleware(MAX_BODY_BYTES), authentication],
        exception_handlers=HANDLERS,
        cors_config=CORSConfig(allow_origins=list(settings.api.cors_origins), allow_credentials=True)
        if settings.api.cors_origins else None,
        openapi_config=OpenAPIConfig(title="LMS Core API", version="0.1.0", path="/schema",
                                     components=Components(security_schemes=SECURITY_SCHEMES)),
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
        logging_config=None,  # lms_core.logs: one JSON line per record, like the bridge
    )
    app.state.settings = settings
    app.state.trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in settings.api.trusted_proxies]
    app.state.metrics = ApiMetrics()
    app.state.export_slots = ExportSlots(settings.api.export_concurrency, settings.api.exports_per_user)
    check_routes(app)
    return app
