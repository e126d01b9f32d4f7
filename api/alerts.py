"""/api/v1/orgs/{org}/alerts and /api/v1/orgs/{org}/devices/{device}/alerts (api/services/alerts.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter
from litestar.status_codes import HTTP_200_OK

from api.access import Access
from api.deps import BIGINT_MAX, AuditLog, Id
from api.services.alerts import Alert, AlertService, AlertState, Filters
from api.services.rules import Severity

Alerts = NamedDependency[AlertService]
Limit = Annotated[int, QueryParameter(ge=1, le=1000)]
#: ``state`` is a name Litestar reserves for the app's state: the parameter is ``in_state``, the query key ``state``.
StateFilter = Annotated[AlertState | None, QueryParameter(name="state", description="only alerts in this state")]
SeverityFilter = Annotated[Severity | None, QueryParameter(description="only alerts of this severity")]
From = Annotated[datetime | None, QueryParameter(name="from", description="fired at or after (RFC 3339)")]
To = Annotated[datetime | None, QueryParameter(name="to", description="fired before (RFC 3339)")]
Before = Annotated[int | None, QueryParameter(ge=1, le=BIGINT_MAX, description="continue after this id")]


class AlertsController(Controller):
    path = "/alerts"
    tags = ["alerts"]

    @get("/", opt={"perm": "devices.read"})
    async def list_alerts(self, access: Access, alerts: Alerts, in_state: StateFilter = None,
                          severity: SeverityFilter = None,
                          device: Annotated[str | None, QueryParameter(max_length=63)] = None,
                          fired_from: From = None, fired_to: To = None, limit: Limit = 100,
                          before: Before = None) -> list[Alert]:
        """The organization's alerts, newest first; continue with ``before`` = the last id."""
        filters = Filters(state=in_state, severity=severity, device=device, fired_from=fired_from, fired_to=fired_to)
        return await alerts.list_alerts(access, filters, limit=limit, before=before)

    @get("/{alert_id:int}", opt={"perm": "devices.read"})
    async def get_alert(self, access: Access, alerts: Alerts, alert_id: Id) -> Alert:
        return await alerts.get(access, alert_id)

    @post("/{alert_id:int}/acknowledge", opt={"perm": "alerts.acknowledge"}, status_code=HTTP_200_OK)
    async def acknowledge(self, access: Access, alerts: Alerts, audit: AuditLog, alert_id: Id) -> Alert:
        """Acknowledge the alert (firing or resolved). Idempotent: acknowledging again keeps the
        first acknowledgement and answers the alert unchanged."""
        return await alerts.acknowledge(access, alert_id, audit)


class DeviceAlertsController(Controller):
    path = "/devices/{device:str}/alerts"
    tags = ["alerts"]

    @get("/", opt={"perm": "devices.read"})
    async def history(self, access: Access, alerts: Alerts, device: FromPath[str], in_state: StateFilter = None,
                      severity: SeverityFilter = None, fired_from: From = None, fired_to: To = None,
                      limit: Limit = 100, before: Before = None) -> list[Alert]:
        """The device's alerts, newest first; continue with ``before`` = the last id."""
        filters = Filters(state=in_state, severity=severity, device=device, fired_from=fired_from, fired_to=fired_to)
        return await alerts.list_alerts(access, filters, limit=limit, before=before)
