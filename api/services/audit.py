"""The audit log: one row per security-relevant change, written in the change's own
transaction, so that a change is never committed without its record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from lms_core.provisioning import Record


async def audit(conn: asyncpg.Connection | asyncpg.Pool, action: str, *, actor: int | None = None,
                org_id: int | None = None, target: str | None = None, detail: dict[str, Any] | None = None,
                address: str | None = None, request_id: str | None = None) -> None:
    await conn.execute(
        """INSERT INTO audit_log (action, actor_user_id, org_id, target, detail, address, request_id)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)""",
        action, actor, org_id, target, json.dumps(detail or {}), address, request_id,
    )


@dataclass(frozen=True, slots=True)
class Audit:
    """What every audit row of one request records besides the change: the client's address
    and the request id. Given to handlers and services as the ``audit`` dependency."""

    address: str
    request_id: str

    async def write(self, conn: asyncpg.Connection, action: str, *, actor: int | None = None,
                    org_id: int | None = None, target: str | None = None,
                    detail: dict[str, Any] | None = None) -> None:
        await audit(conn, action, actor=actor, org_id=org_id, target=target, detail=detail,
                    address=self.address, request_id=self.request_id)

    def record(self, action: str, *, actor: int, org_id: int | None = None,
               detail: dict[str, Any] | None = None) -> Record:
        """The row of a change the :class:`~lms_core.provisioning.Provisioner` makes, for it
        to write inside its own transaction (it knows the target, e.g. a new login's name)."""

        async def write(conn: asyncpg.Connection, target: str) -> None:
            await self.write(conn, action, actor=actor, org_id=org_id, target=target, detail=detail)

        return write
