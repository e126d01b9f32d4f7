"""Alert rules of an organization: /api/v1/orgs/{org}/rules. The bridge evaluates them
(bridge/rules.py); this module stores them, checked whole.

A rule is checked as a whole on every create and update (an update is merged over the
stored rule first): what the bridge reads is always a rule it can evaluate. Every change
bumps ``rules_version`` (a trigger of migration 0007), which the bridge reads before each
batch and reloads its rules on.

Alerts do not outlive the definition that raised them. Deleting a rule, disabling it, or
changing what it watches (kind, metric, comparison, thresholds, duration, scope) resolves its
firing alerts in the same transaction (reason ``rule deleted`` / ``rule disabled`` /
``rule changed``), with their MQTT message and webhook deliveries, and forgets its
evaluation state (``rule_state``): the changed rule starts afresh, and no alert stays firing
that no rule would ever resolve. Renaming, a new severity or cooldown, or enabling keep
them.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import asyncpg
import msgspec
from msgspec import UNSET, Meta, UnsetType

from api.services.audit import Audit
from api.services.devices import Slug, Tag
from lms_core.alerts import CLEAR_ABOVE, CLEAR_BELOW, write_notifications
from lms_core.errors import InvalidInput, NotFound
from lms_core.settings import Settings
from lms_core.topics import TopicScheme

if TYPE_CHECKING:
    from api.access import OrgAccess

Kind = Literal["threshold", "no_data", "offline"]
Comparison = Literal[">", ">=", "<", "<=", "==", "!="]
Severity = Literal["critical", "major", "minor", "warning", "info"]
RuleName = Annotated[str, Meta(min_length=1, max_length=200)]
Metric = Annotated[str, Meta(min_length=1, max_length=200, description="a metric name as the bridge stores it "
                                                                          "(LMS_METRIC_PATTERN)")]
#: A year: longer holds or cooldowns are a mistake (and must fit PostgreSQL's integer).
MAX_SECONDS = 366 * 86400
Seconds = Annotated[int, Meta(ge=0, le=MAX_SECONDS)]

#: Advisory-lock namespace (first key of pg_advisory_xact_lock(int, int)) of counting an
#: organization's rules before adding one: two concurrent creates cannot both take the last place.
_LOCK_RULE_COUNT = 0x4C4D5320
#: Fields whose change starts the rule afresh (see the module's docstring).
_CONDITION = ("kind", "metric", "comparison", "threshold", "clear_threshold", "duration_s", "scope")


class RuleScope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Which devices a rule watches, exactly one of: ``{"device": slug}`` (one device),
    ``{"tag": t}`` (every device with that tag, now or later), ``{"asset": slug}`` (every
    device of the asset) or ``{"org": true}`` (every device of the organization)."""

    device: Slug | None = None
    tag: Tag | None = None
    asset: Slug | None = None
    org: bool | None = None


class RuleCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A rule. ``threshold``: ``metric comparison threshold`` held for ``duration_s`` (device
    time; 0 = at once), cleared past ``clear_threshold`` if given (hysteresis), else when
    the condition is false. ``no_data``: no telemetry from a device for ``duration_s``;
    ``offline``: the device's status ``offline`` for ``duration_s`` (both: no metric,
    comparison or thresholds). ``cooldown_s``: after resolving, the rule may not fire again
    for that device before this many seconds."""

    name: RuleName
    kind: Kind = "threshold"
    metric: Metric | None = None
    comparison: Comparison | None = None
    threshold: float | None = None
    clear_threshold: float | None = None
    duration_s: Seconds = 0
    cooldown_s: Seconds = 0
    severity: Severity = "warning"
    enabled: bool = True
    scope: RuleScope


class RuleUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields to change; the others keep their values. ``null`` removes an optional value
    (e.g. ``"clear_threshold": null``). The result is checked like a new rule."""

    name: RuleName | UnsetType = UNSET
    kind: Kind | UnsetType = UNSET
    metric: Metric | UnsetType | None = UNSET
    comparison: Comparison | UnsetType | None = UNSET
    threshold: float | UnsetType | None = UNSET
    clear_threshold: float | UnsetType | None = UNSET
    duration_s: Seconds | UnsetType = UNSET
    cooldown_s: Seconds | UnsetType = UNSET
    severity: Severity | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    scope: RuleScope | UnsetType = UNSET


class Rule(msgspec.Struct):
    id: int
    name: str
    kind: Kind
    metric: str | None
    comparison: Comparison | None
    threshold: float | None
    clear_threshold: float | None
    duration_s: int
    cooldown_s: int
    severity: Severity
    enabled: bool
    scope: RuleScope
    #: alerts of this rule firing now (one per device at most)
    firing: int
    created_at: datetime
    updated_at: datetime


_COLUMNS = """r.id, r.name, r.kind, r.metric, r.comparison, r.threshold, r.clear_threshold, r.duration_s,
              r.cooldown_s, r.severity, r.enabled, r.scope_kind, r.scope_tag, r.created_at, r.updated_at,
              d.slug AS scope_device, a.slug AS scope_asset,
              (SELECT count(*) FROM alerts al WHERE al.rule_id = r.id AND al.state = 'firing') AS firing"""
_FROM = """alert_rules r LEFT JOIN devices d ON d.id = r.scope_device_id
           LEFT JOIN assets a ON a.id = r.scope_asset_id"""


def _scope(r: Any) -> RuleScope:
    kind = r["scope_kind"]
    if kind == "device":
        return RuleScope(device=r["scope_device"])
    if kind == "tag":
        return RuleScope(tag=r["scope_tag"])
    if kind == "asset":
        return RuleScope(asset=r["scope_asset"])
    return RuleScope(org=True)


def _rule(r: Any) -> Rule:
    return Rule(id=r["id"], name=r["name"], kind=r["kind"], metric=r["metric"], comparison=r["comparison"],
                threshold=r["threshold"], clear_threshold=r["clear_threshold"], duration_s=r["duration_s"],
                cooldown_s=r["cooldown_s"], severity=r["severity"], enabled=r["enabled"], scope=_scope(r),
                firing=r["firing"], created_at=r["created_at"], updated_at=r["updated_at"])


def problems(rule: RuleCreate, metric_pattern: str) -> list[str]:
    """What is wrong with ``rule``, each in words a caller can act on (empty: nothing)."""
    wrong: list[str] = []
    given = [k for k in ("device", "tag", "asset", "org") if getattr(rule.scope, k) is not None]
    if len(given) != 1:
        wrong.append('scope must be exactly one of {"device": slug}, {"tag": tag}, {"asset": slug}, {"org": true}')
    elif rule.scope.org is False:
        wrong.append('scope {"org": false} names no devices; use {"org": true}')
    for field in ("threshold", "clear_threshold"):
        value = getattr(rule, field)
        if value is not None and not math.isfinite(value):
            wrong.append(f"{field} must be a finite number")
    if rule.kind == "threshold":
        if rule.metric is None:
            wrong.append("a threshold rule needs a metric")
        elif not re.fullmatch(metric_pattern, rule.metric):
            wrong.append(f"metric {rule.metric!r} is not a metric name the bridge stores (it must match "
                         f"{metric_pattern})")
        if rule.comparison is None:
            wrong.append("a threshold rule needs a comparison (>, >=, <, <=, ==, !=)")
        if rule.threshold is None:
            wrong.append("a threshold rule needs a threshold")
        clear = rule.clear_threshold
        if clear is not None and rule.threshold is not None and rule.comparison is not None:
            if rule.comparison in ("==", "!="):
                wrong.append(f"a {rule.comparison} rule takes no clear_threshold: it clears when the condition "
                             f"no longer holds")
            elif rule.comparison in CLEAR_BELOW and clear > rule.threshold:
                wrong.append(f"clear_threshold {clear:g} is on the wrong side: a {rule.comparison} rule clears "
                             f"when the value falls below it, so it must be at most the threshold "
                             f"{rule.threshold:g}")
            elif rule.comparison in CLEAR_ABOVE and clear < rule.threshold:
                wrong.append(f"clear_threshold {clear:g} is on the wrong side: a {rule.comparison} rule clears "
                             f"when the value rises above it, so it must be at least the threshold "
                             f"{rule.threshold:g}")
    else:
        for field in ("metric", "comparison", "threshold", "clear_threshold"):
            if getattr(rule, field) is not None:
                wrong.append(f"a {rule.kind} rule takes no {field}")
        if rule.duration_s < 1:
            wrong.append(f"a {rule.kind} rule needs duration_s of at least 1: how long the device must be "
                         f"{'silent' if rule.kind == 'no_data' else 'offline'} before it fires")
    return wrong


class RuleService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.topics = TopicScheme(settings.topic_root)

    def _checked(self, rule: RuleCreate) -> None:
        wrong = problems(rule, self.settings.limits.metric_pattern)
        if wrong:
            raise InvalidInput("; ".join(wrong))

    async def _scope_ids(self, conn: asyncpg.Connection, access: OrgAccess,
                         scope: RuleScope) -> tuple[str, int | None, str | None, int | None]:
        """(scope_kind, scope_device_id, scope_tag, scope_asset_id). A device or asset must be
        this organization's: another's is not found, exactly as one that does not exist."""
        if scope.device is not None:
            dev_id = await conn.fetchval("SELECT id FROM devices WHERE org_id = $1 AND slug = $2",
                                         access.org_id, scope.device)
            if dev_id is None:
                raise InvalidInput(f"scope: device {scope.device!r} not found in this organization")
            return "device", dev_id, None, None
        if scope.asset is not None:
            asset_id = await conn.fetchval("SELECT id FROM assets WHERE org_id = $1 AND slug = $2",
                                           access.org_id, scope.asset)
            if asset_id is None:
                raise InvalidInput(f"scope: asset {scope.asset!r} not found in this organization")
            return "asset", None, None, asset_id
        if scope.tag is not None:
            return "tag", None, scope.tag, None
        return "org", None, None, None

    async def _fetch(self, conn: asyncpg.Connection | asyncpg.Pool, access: OrgAccess, rule_id: int) -> Rule:
        r = await conn.fetchrow(f"SELECT {_COLUMNS} FROM {_FROM} WHERE r.id = $1 AND r.org_id = $2",
                                rule_id, access.org_id)
        if r is None:
            raise NotFound(f"rule {rule_id} not found")
        return _rule(r)

    async def list_rules(self, access: OrgAccess, *, limit: int, after: int | None) -> list[Rule]:
        """By id; continue with ``after`` = the last id of a page."""
        rows = await self.pool.fetch(
            f"""SELECT {_COLUMNS} FROM {_FROM} WHERE r.org_id = $1 AND ($2::bigint IS NULL OR r.id > $2)
                ORDER BY r.id LIMIT $3""", access.org_id, after, limit)
        return [_rule(r) for r in rows]

    async def get(self, access: OrgAccess, rule_id: int) -> Rule:
        return await self._fetch(self.pool, access, rule_id)

    async def create(self, access: OrgAccess, data: RuleCreate, audit: Audit) -> Rule:
        self._checked(data)
        limit = self.settings.alerts.max_rules_per_org
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2::bigint::text))", _LOCK_RULE_COUNT,
                               access.org_id)
            if await conn.fetchval("SELECT count(*) FROM alert_rules WHERE org_id = $1", access.org_id) >= limit:
                raise InvalidInput(f"this organization has {limit} rules, the most it may have "
                                   f"(LMS_RULES_MAX_PER_ORG); delete one first")
            kind, dev_id, tag, asset_id = await self._scope_ids(conn, access, data.scope)
            rule_id = await conn.fetchval(
                """INSERT INTO alert_rules (org_id, name, kind, metric, comparison, threshold, clear_threshold,
                                            duration_s, cooldown_s, severity, enabled, scope_kind, scope_device_id,
                                            scope_tag, scope_asset_id, created_by)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING id""",
                access.org_id, data.name, data.kind, data.metric, data.comparison, data.threshold,
                data.clear_threshold, data.duration_s, data.cooldown_s, data.severity, data.enabled, kind, dev_id,
                tag, asset_id, access.principal.user_id)
            await audit.write(conn, "rule.created", actor=access.principal.user_id, org_id=access.org_id,
                              target=data.name, detail={"rule_id": rule_id, **msgspec.to_builtins(data)})
            return await self._fetch(conn, access, rule_id)

    async def _locked(self, conn: asyncpg.Connection, access: OrgAccess, rule_id: int) -> Rule:
        """The rule, its row locked FOR UPDATE. Taken before anything else of the rule's: a
        bridge's batch or sweep that already evaluates it (holding the rule's row FOR SHARE,
        bridge/rules.py ``lock_rules``) commits first, and a new one waits for this
        transaction and then sees the change, so the two never wait on each other in a cycle."""
        found = await conn.fetchval("SELECT id FROM alert_rules WHERE id = $1 AND org_id = $2 FOR UPDATE",
                                    rule_id, access.org_id)
        if found is None:
            raise NotFound(f"rule {rule_id} not found")
        return await self._fetch(conn, access, rule_id)

    async def _resolve_firing(self, conn: asyncpg.Connection, rule_id: int, reason: str) -> int:
        """Resolve the rule's firing alerts (now, no value) and queue their notifications;
        forget its evaluation state. The caller holds the rule's row lock (:meth:`_locked`)."""
        await conn.execute("SELECT 1 FROM rule_state WHERE rule_id = $1 ORDER BY device_id FOR UPDATE", rule_id)
        ids = [r["id"] for r in await conn.fetch(
            """UPDATE alerts SET state = 'resolved', resolved_at = now(), resolved_evaluated_at = now(),
                                 resolved_reason = $2
               WHERE rule_id = $1 AND state = 'firing' RETURNING id""", rule_id, reason)]
        await write_notifications(conn, ids, self.topics)
        await conn.execute("DELETE FROM rule_state WHERE rule_id = $1", rule_id)
        return len(ids)

    async def update(self, access: OrgAccess, rule_id: int, data: RuleUpdate, audit: Audit) -> Rule:
        changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not UNSET}
        async with self.pool.acquire() as conn, conn.transaction():
            old = await self._locked(conn, access, rule_id)
            merged = RuleCreate(**{f: getattr(old, f) for f in RuleCreate.__struct_fields__} | changes)
            self._checked(merged)
            kind, dev_id, tag, asset_id = await self._scope_ids(conn, access, merged.scope)
            changed = {k for k in changes if getattr(old, k) != getattr(merged, k)}
            resolved = 0
            if old.enabled and not merged.enabled:
                resolved = await self._resolve_firing(conn, rule_id, "rule disabled")
            elif changed & set(_CONDITION):
                resolved = await self._resolve_firing(conn, rule_id, "rule changed")
            await conn.execute(
                """UPDATE alert_rules SET name = $2, kind = $3, metric = $4, comparison = $5, threshold = $6,
                          clear_threshold = $7, duration_s = $8, cooldown_s = $9, severity = $10, enabled = $11,
                          scope_kind = $12, scope_device_id = $13, scope_tag = $14, scope_asset_id = $15,
                          updated_at = now()
                   WHERE id = $1""",
                rule_id, merged.name, merged.kind, merged.metric, merged.comparison, merged.threshold,
                merged.clear_threshold, merged.duration_s, merged.cooldown_s, merged.severity, merged.enabled, kind,
                dev_id, tag, asset_id)
            await audit.write(conn, "rule.updated", actor=access.principal.user_id, org_id=access.org_id,
                              target=merged.name, detail={"rule_id": rule_id, "resolved_alerts": resolved,
                                                          **msgspec.to_builtins(changes)})
            return await self._fetch(conn, access, rule_id)

    async def delete(self, access: OrgAccess, rule_id: int, audit: Audit) -> None:
        """Delete the rule; its firing alerts resolve (``rule deleted``), its history stays."""
        async with self.pool.acquire() as conn, conn.transaction():
            old = await self._locked(conn, access, rule_id)
            resolved = await self._resolve_firing(conn, rule_id, "rule deleted")
            await conn.execute("DELETE FROM alert_rules WHERE id = $1", rule_id)
            await audit.write(conn, "rule.deleted", actor=access.principal.user_id, org_id=access.org_id,
                              target=old.name, detail={"rule_id": rule_id, "resolved_alerts": resolved})
