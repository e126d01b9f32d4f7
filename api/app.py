"""The API's composition root: settings in, a Litestar app out."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig

from api.access import check_routes
from api.assets import AssetsController
from api.auth.routes import AuthController
from api.auth.service import AuthService, retention_sweeper
from api.data import DataController
from api.devices import DevicesController
from api.errors import HANDLERS
from api.keys import ApiKeysController
from api.observability import ApiMetrics, health, metrics, ready, request_id_middleware
from api.orgs import OrgController, OrgsController
from api.technicians import TechniciansController, expiry_sweeper
from lms_core import db
from lms_core.settings import Settings


def create_app(settings: Settings) -> Litestar:
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with db.create_pool(settings.database_url, min_size=1, max_size=10) as pool:
            app.state.pool = pool
            app.state.auth = AuthService(pool, settings.api, settings.secret_key)
            sweeper = asyncio.create_task(expiry_sweeper(app), name="technician expiry sweep")
            retention = asyncio.create_task(retention_sweeper(app), name="retention sweep")
            try:
                yield
            finally:
                for task in (retention, sweeper):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    app = Litestar(
        route_handlers=[AuthController, OrgsController, OrgController, DevicesController, DataController,
                        TechniciansController, ApiKeysController,
                        AssetsController, health, ready, metrics],
        lifespan=[lifespan],
        middleware=[request_id_middleware],
        exception_handlers=HANDLERS,
        cors_config=CORSConfig(allow_origins=list(settings.api.cors_origins), allow_credentials=True)
        if settings.api.cors_origins else None,
        openapi_config=OpenAPIConfig(title="LMS Core API", version="0.1.0", path="/schema"),
        request_max_body_size=1024 * 1024,
        debug=False,
        logging_config=None,  # lms_core.logs: one JSON line per record, like the bridge
    )
    app.state.settings = settings
    app.state.trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in settings.api.trusted_proxies]
    app.state.metrics = ApiMetrics()
    check_routes(app)
    return app
