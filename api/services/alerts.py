"""Alerts of an organization, as the bridge raised and resolved them: lists with filters,
one alert, and acknowledging one (who and when, audited).

Lists are newest first by id, the order in which the platform raised the alerts (an alert on
late data, raised today for a reading of yesterday, is new); continue with ``before`` = the
last id of a page. ``from``/``to`` filter on ``fired_at``, the device time of the firing.

Acknowledging is idempotent: the first acknowledgement is kept (who and when) and audited;
acknowledging again answers the alert as it is, unchanged. A resolved alert may be
acknowledged too.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import msgspec

from api.services.audit import Audit
from lms_core.errors import NotFound

if TYPE_CHECKING:
    from api.access import OrgAccess

AlertState = Literal["firing", "resolved"]


class Alert(msgspec.Struct):
    id: int
    device: str
    #: null once the rule is deleted; ``rule`` keeps its name
    rule_id: int | None
    rule: str
    kind: str
    severity: str
    metric: str | None
    state: AlertState
    #: the value that fired it, and the device time it was measured at (no_data/offline: the deadline)
    value: float | None
    fired_at: datetime
    #: when the platform decided
    fired_evaluated_at: datetime
    resolved_value: float | None
    resolved_at: datetime | None
    resolved_evaluated_at: datetime | None
    resolved_reason: str | None
    acknowledged_at: datetime | None
    #: the email of who acknowledged it
    acknowledged_by: str | None


class Filters(msgspec.Struct, frozen=True):
    state: str | None = None
    severity: str | None = None
    device: str | None = None
    fired_from: datetime | None = None
    fired_to: datetime | None = None


_SELECT = """SELECT a.id, d.slug AS device, a.rule_id, a.rule_name, a.kind, a.severity, a.metric, a.state, a.value,
                    a.fired_at, a.fired_evaluated_at, a.resolved_value, a.resolved_at, a.resolved_evaluated_at,
                    a.resolved_reason, a.acknowledged_at, u.email AS acknowledged_by
             FROM alerts a JOIN devices d ON d.id = a.device_id LEFT JOIN users u ON u.id = a.acknowledged_by"""


def _alert(r: Any) -> Alert:
    return Alert(id=r["id"], device=r["device"], rule_id=r["rule_id"], rule=r["rule_name"], kind=r["kind"],
                 severity=r["severity"], metric=r["metric"], state=r["state"], value=r["value"],
                 fired_at=r["fired_at"], fired_evaluated_at=r["fired_evaluated_at"],
                 resolved_value=r["resolved_value"], resolved_at=r["resolved_at"],
                 resolved_evaluated_at=r["resolved_evaluated_at"], resolved_reason=r["resolved_reason"],
                 acknowledged_at=r["acknowledged_at"], acknowledged_by=r["acknowledged_by"])


class AlertService:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def list_alerts(self, access: OrgAccess, filters: Filters, *, limit: int,
                          before: int | None) -> list[Alert]:
        """Newest first; a device filter names one of this organization's devices (404 otherwise)."""
        async with self.pool.acquire() as conn:
            dev_id = None
            if filters.device is not None:
                dev_id = await conn.fetchval("SELECT id FROM devices WHERE org_id = $1 AND slug = $2",
                                             access.org_id, filters.device)
                if dev_id is None:
                    raise NotFound(f"device {filters.device!r} not found")
            rows = await conn.fetch(
                f"""{_SELECT}
                    WHERE a.org_id = $1 AND ($2::bigint IS NULL OR a.device_id = $2)
                      AND ($3::text IS NULL OR a.state = $3) AND ($4::text IS NULL OR a.severity = $4)
                      AND ($5::timestamptz IS NULL OR a.fired_at >= $5)
                      AND ($6::timestamptz IS NULL OR a.fired_at < $6)
                      AND ($7::bigint IS NULL OR a.id < $7)
                    ORDER BY a.id DESC LIMIT $8""",
                access.org_id, dev_id, filters.state, filters.severity, filters.fired_from, filters.fired_to,
                before, limit)
        return [_alert(r) for r in rows]

    async def get(self, access: OrgAccess, alert_id: int) -> Alert:
        r = await self.pool.fetchrow(f"{_SELECT} WHERE a.id = $1 AND a.org_id = $2", alert_id, access.org_id)
        if r is None:
            raise NotFound(f"alert {alert_id} not found")
        return _alert(r)

    async def acknowledge(self, access: OrgAccess, alert_id: int, audit: Audit) -> Alert:
        """Record who acknowledged the alert and when; the first acknowledgement stays."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                """UPDATE alerts a SET acknowledged_at = now(), acknowledged_by = $3 FROM devices d
                   WHERE a.id = $1 AND a.org_id = $2 AND a.acknowledged_at IS NULL AND d.id = a.device_id
                   RETURNING d.slug AS device, a.rule_name, a.severity, a.state""",
                alert_id, access.org_id, access.principal.user_id)
            if r is not None:
                await audit.write(conn, "alert.acknowledged", actor=access.principal.user_id, org_id=access.org_id,
                                  target=r["device"], detail={"alert_id": alert_id, "rule": r["rule_name"],
                                                              "severity": r["severity"], "state": r["state"]})
        return await self.get(access, alert_id)
