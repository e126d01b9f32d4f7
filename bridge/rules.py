"""Alert rules, the bridge's half: evaluated on what a batch has just stored, in its transaction.

Three parts, from pure to wired:

- :func:`step`, the state machine of one (rule, device) pair: pure, no I/O, property-tested
  against a reference model (tests/test_rule_engine.py). Times are epoch seconds.
- :class:`RuleEngine`: a cache of the enabled rules (indexed by metric), the webhooks and
  the scope facts of devices, reloaded when ``rules_version`` (or the device directory)
  moves - the store reads both counters in one query before each batch. :meth:`evaluate`
  runs inside the batch's transaction, after the readings were written: it share-locks the
  rules it is about to use and reads the counters again (:func:`lock_rules`; a change
  committed in between reloads the cache first), locks the ``rule_state`` rows of the
  (rule, device) pairs the batch touched, in (rule_id, device_id) order so that two bridges
  never deadlock, feeds each pair its readings in device-time order, and writes the state,
  the alert changes and their notifications (``mqtt_outbox``, ``webhook_deliveries``) in
  that same transaction. So a batch evaluates a rule exactly as committed: never a rule
  the API has deleted, disabled or changed (and whose alerts it resolved) meanwhile.
- :class:`RuleSweeper`: no-data and offline rules fire on time with no traffic at all; a
  task of the bridge sweeps every :data:`SWEEP_S` with one set-based query, holding a
  transaction-level advisory lock so that one bridge sweeps at a time; it locks the rules
  of what it found the same way, and starts again if one changed since its query.

Semantics of a threshold rule, per (rule, device), in device time (``ts``):

- a reading with ``ts <= last_ts`` (the newest reading evaluated for the pair) is ignored:
  late data (an offline backlog) is stored but never flips today's state, and a
  redelivered batch evaluates nothing twice;
- condition true: ``since = since or ts``; it fires when ``ts - since >= duration_s``,
  ``ts >= cooldown_until`` and no alert of the pair is firing;
- a firing alert resolves when the value is past the clear threshold (below it for ``>``
  and ``>=``, above it for ``<`` and ``<=``) or, without one, when the condition is false;
  then ``cooldown_until = ts + cooldown_s``;
- a false condition (or a resolution) resets ``since``.

No-data rules count receipt time: ``rule_state.last_seen_at`` is the receipt time of the
device's newest telemetry (written by the batches), and a device that never sent anything
counts from the later of the rule's and the device's creation. Offline rules read
``devices.status``/``status_changed_at`` (written by the presence update of the batches);
both count at the earliest from the rule's creation, so a new rule gives every device a
full window. A no-data alert resolves in the batch that brings the next telemetry; an
offline alert resolves in the next sweep after the device is back online.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from bridge.metrics import BridgeMetrics
from bridge.outbox import LEASE_S, OutboxMessage
from lms_core.alerts import CLEAR_ABOVE, CLEAR_BELOW, alert_message, webhook_event, write_notifications
from lms_core.db import translate
from lms_core.errors import DatabaseUnavailable, StorageError
from lms_core.topics import TopicScheme

log = logging.getLogger("lms.bridge.rules")

THRESHOLD, NO_DATA, OFFLINE = "threshold", "no_data", "offline"

#: :func:`step` outcomes.
NOTHING, FIRE, RESOLVE, LATE = 0, 1, 2, 3

#: How often the no-data/offline sweep runs: an alert fires at most this long (plus the
#: sweep's own time) after its deadline. One small query per second when such rules exist.
SWEEP_S = 1.0
#: The sweep's transaction-level advisory lock (one bridge sweeps at a time; the others
#: skip that round). An arbitrary constant, distinct from lms_core/provisioning.py's.
SWEEP_LOCK = 7_310_201_709
#: A batch writes a no-data pair's ``last_seen_at`` at most this often (while the device
#: keeps sending) - a write per device per batch otherwise. Only for rules of at least
#: :data:`SEEN_MIN_DURATION_S`: the sweep fires after ``duration_s`` of silence, so a pair
#: refreshed every second can never be seen silent that long.
SEEN_EVERY_S = 1.0
SEEN_MIN_DURATION_S = 5


# -- the state machine (pure) ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Rule:
    """One enabled rule, as cached (migration 0007 ``alert_rules``)."""

    id: int
    org_id: int
    name: str
    kind: str = THRESHOLD
    severity: str = "warning"
    metric: str | None = None
    comparison: str | None = None
    threshold: float | None = None
    clear_threshold: float | None = None
    duration_s: int = 0
    cooldown_s: int = 0
    scope_kind: str = "org"
    scope_device_id: int | None = None
    scope_tag: str | None = None
    scope_asset_id: int | None = None
    created_at: float = 0.0


@dataclass(slots=True)
class PairState:
    """``rule_state`` of one (rule, device) pair; times in epoch seconds."""

    last_ts: float | None = None
    since: float | None = None
    firing: bool = False
    cooldown_until: float | None = None


def holds(comparison: str | None, value: float, threshold: float | None) -> bool:
    """``value <comparison> threshold``."""
    assert threshold is not None
    if comparison == ">":
        return value > threshold
    if comparison == ">=":
        return value >= threshold
    if comparison == "<":
        return value < threshold
    if comparison == "<=":
        return value <= threshold
    if comparison == "==":
        return value == threshold
    if comparison == "!=":
        return value != threshold
    raise ValueError(f"unknown comparison {comparison!r}")


def step(rule: Rule, s: PairState, ts: float, value: float) -> int:
    """Feed one reading (device time ``ts``) of the pair to its state ``s``; return
    :data:`FIRE`, :data:`RESOLVE`, :data:`LATE` (ignored) or :data:`NOTHING`."""
    if s.last_ts is not None and ts <= s.last_ts:
        return LATE
    s.last_ts = ts
    cond = holds(rule.comparison, value, rule.threshold)
    if s.firing:
        clear = rule.clear_threshold
        if clear is None or rule.comparison not in CLEAR_BELOW + CLEAR_ABOVE:
            cleared = not cond
        elif rule.comparison in CLEAR_BELOW:
            cleared = value < clear
        else:
            cleared = value > clear
        if cleared:
            s.firing = False
            s.since = None
            s.cooldown_until = ts + rule.cooldown_s
            return RESOLVE
        return NOTHING  # (``since`` means nothing while firing; it is reset on resolving)
    if not cond:
        s.since = None
        return NOTHING
    if s.since is None:
        s.since = ts
    if ts - s.since >= rule.duration_s and (s.cooldown_until is None or ts >= s.cooldown_until):
        s.firing = True
        return FIRE
    return NOTHING


def _quiet(rule: Rule, firing: bool, values: list[float]) -> bool:
    """True when no value of ``values`` can change the pair's state: nothing fires (no value
    meets the condition) or, while firing, nothing resolves. One C-level min/max/in over
    the values: the common case - thresholds not crossed - costs no Python loop."""
    c, t = rule.comparison, rule.threshold
    assert t is not None
    if not firing:
        if c == ">":
            return max(values) <= t
        if c == ">=":
            return max(values) < t
        if c == "<":
            return min(values) >= t
        if c == "<=":
            return min(values) > t
        if c == "==":
            return t not in values
        return min(values) == max(values) == t  # "!="
    clear = rule.clear_threshold
    if clear is not None and c in CLEAR_BELOW:
        return min(values) >= clear
    if clear is not None and c in CLEAR_ABOVE:
        return max(values) <= clear
    if c == ">":
        return min(values) > t
    if c == ">=":
        return min(values) >= t
    if c == "<":
        return max(values) < t
    if c == "<=":
        return max(values) <= t
    if c == "==":
        return min(values) == max(values) == t
    return t not in values  # "!="


def feed(rule: Rule, s: PairState, times: list[float], values: list[float]) -> tuple[list[tuple[int, int]], int]:
    """Feed a pair its readings of one batch (``times`` ascending, ``values`` beside them);
    return the (index, FIRE/RESOLVE) changes and how many readings were late. The same as
    :func:`step` on each reading, with a fast path for a batch that changes nothing."""
    start = 0 if s.last_ts is None else bisect.bisect_right(times, s.last_ts)
    if start == len(times):
        return [], start
    window = values[start:] if start else values
    if _quiet(rule, s.firing, window):
        s.last_ts = times[-1]
        if not s.firing:
            s.since = None
        return [], start
    changes = []
    late = start
    for i in range(start, len(times)):
        r = step(rule, s, times[i], values[i])
        if r == FIRE or r == RESOLVE:
            changes.append((i, r))
        elif r == LATE:
            late += 1
    return changes, late


# -- the cache ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What scopes and notifications need of a device."""

    org_id: int
    org: str
    slug: str
    tags: frozenset[str]
    assets: frozenset[int]


def in_scope(rule: Rule, device_id: int, d: DeviceFacts) -> bool:
    if rule.org_id != d.org_id:
        return False
    kind = rule.scope_kind
    if kind == "org":
        return True
    if kind == "device":
        return rule.scope_device_id == device_id
    if kind == "tag":
        return rule.scope_tag in d.tags
    if kind == "asset":
        return rule.scope_asset_id in d.assets
    return False


@dataclass
class Snapshot:
    """The cached rules and webhooks of one ``rules_version``; device facts filled lazily."""

    version: int | None = None
    directory_version: int | None = None
    rules: dict[int, Rule] = field(default_factory=dict)
    #: Threshold rules by metric: a reading whose metric has no rule costs this one lookup.
    by_metric: dict[str, list[Rule]] = field(default_factory=dict)
    no_data: list[Rule] = field(default_factory=list)
    timed: bool = False  # any no_data or offline rule (the sweep has work)
    #: org id -> [(webhook id, severities)] of enabled webhooks.
    webhooks: dict[int, list[tuple[int, frozenset[str]]]] = field(default_factory=dict)
    devices: dict[int, DeviceFacts] = field(default_factory=dict)
    #: (device, metric) -> the threshold rules of that metric in the device's scope.
    matched: dict[tuple[int, str], tuple[Rule, ...]] = field(default_factory=dict)
    #: device -> its no-data rules.
    no_data_of: dict[int, tuple[Rule, ...]] = field(default_factory=dict)


def _ts(v: datetime | None) -> float | None:
    return None if v is None else v.timestamp()


def _dt(v: float) -> datetime:
    return datetime.fromtimestamp(v, UTC)


# -- alert changes and their notifications ----------------------------------------------

@dataclass(slots=True)
class NewAlert:
    """An alert fired now; ``resolved`` set when it also resolved in the same evaluation."""

    rule: Rule
    device_id: int
    value: float | None
    fired_at: datetime
    id: int = 0
    resolved: tuple[float | None, datetime, str] | None = None


@dataclass(slots=True)
class Resolution:
    """An alert stored before, resolved now."""

    alert_id: int
    rule: Rule
    device_id: int
    value: float | None
    at: datetime
    reason: str


@dataclass
class Changes:
    """What one evaluation (a batch's or a sweep's) writes besides ``rule_state``."""

    new: list[NewAlert] = field(default_factory=list)
    resolved: list[Resolution] = field(default_factory=list)
    #: In the order they happened: ("firing", NewAlert) or ("resolved", NewAlert | Resolution).
    events: list[tuple[str, NewAlert | Resolution]] = field(default_factory=list)

    def fire(self, rule: Rule, device_id: int, value: float | None, at: datetime) -> NewAlert:
        a = NewAlert(rule, device_id, value, at)
        self.new.append(a)
        self.events.append(("firing", a))
        return a

    def resolve(self, current: NewAlert | int, rule: Rule, device_id: int, value: float | None, at: datetime,
                reason: str) -> None:
        if isinstance(current, NewAlert):
            current.resolved = (value, at, reason)
            self.events.append(("resolved", current))
        else:
            r = Resolution(current, rule, device_id, value, at, reason)
            self.resolved.append(r)
            self.events.append(("resolved", r))


@dataclass(slots=True)
class Plan:
    """What a batch gives the rules to do, under one snapshot (:meth:`RuleEngine._plan`)."""

    #: (rule, device) -> (device times, values, the readings' datetimes), ascending.
    pairs: dict[tuple[int, int], tuple[list[float], list[float], list[datetime]]]
    #: no-data (rule, device) -> receipt time to write as last_seen_at.
    seen_pairs: dict[tuple[int, int], float]
    keys: list[tuple[int, int]]  # of both, sorted (the lock order)


@dataclass
class Evaluated:
    """What :meth:`RuleEngine.evaluate` did, for metrics and for the outbox after commit."""

    fired: int = 0
    resolved: int = 0
    #: The alert messages written to ``mqtt_outbox``: (row id, topic, payload), leased to
    #: this bridge (bridge/outbox.py), published from memory once committed.
    messages: list[OutboxMessage] = field(default_factory=list)
    deliveries: int = 0  # webhook deliveries queued
    late: int = 0
    seconds: float = 0.0
    #: (rule, device) -> receipt time written as last_seen_at (kept once committed).
    seen_written: dict[tuple[int, int], float] = field(default_factory=dict)


_encode = msgspec.json.Encoder().encode


async def write_changes(conn: asyncpg.Connection, ch: Changes, where: dict[int, tuple[str, str]],
                        webhooks: dict[int, list[tuple[int, frozenset[str]]]], topics: TopicScheme,
                        evaluated_at: datetime) -> tuple[list[OutboxMessage], int]:
    """Write the alert changes ``ch`` and their notifications in the caller's transaction;
    ``where``: device id -> (org slug, device slug). New alerts must have their ids.
    Returns the alert messages written, their ``mqtt_outbox`` rows leased to this bridge
    for :data:`bridge.outbox.LEASE_S` (it publishes them itself once committed), and how
    many webhook deliveries were queued."""
    if ch.resolved:
        # Resolutions first: a pair whose old alert resolves and whose new one fires in the
        # same evaluation must never hold two firing rows (alerts_one_firing).
        rows = await conn.fetch(
            """UPDATE alerts a SET state = 'resolved', resolved_value = u.v, resolved_at = u.at,
                   resolved_evaluated_at = $5, resolved_reason = u.reason
               FROM unnest($1::bigint[], $2::float8[], $3::timestamptz[], $4::text[]) AS u(id, v, at, reason)
               WHERE a.id = u.id AND a.state = 'firing'
               RETURNING a.id, a.value, a.fired_at""",
            [r.alert_id for r in ch.resolved], [r.value for r in ch.resolved], [r.at for r in ch.resolved],
            [r.reason for r in ch.resolved], evaluated_at)
        stored = {r["id"]: (r["value"], r["fired_at"]) for r in rows}
    else:
        stored = {}
    if ch.new:
        cols: tuple[list[Any], ...] = tuple([] for _ in range(14))
        for a in ch.new:
            res = a.resolved
            for col, v in zip(cols, (
                    a.id, a.rule.org_id, a.rule.id, a.device_id, a.rule.name, a.rule.kind, a.rule.severity,
                    a.rule.metric, "firing" if res is None else "resolved", a.value, a.fired_at,
                    None if res is None else res[0], None if res is None else res[1],
                    None if res is None else res[2]), strict=True):
                col.append(v)
        await conn.execute(
            """INSERT INTO alerts (id, org_id, rule_id, device_id, rule_name, kind, severity, metric, state, value,
                                   fired_at, fired_evaluated_at, resolved_value, resolved_at, resolved_evaluated_at,
                                   resolved_reason)
               SELECT id, org, rule, dev, name, kind, sev, metric, state, v, fired, $15, rv, rat,
                      CASE WHEN rat IS NULL THEN NULL ELSE $15::timestamptz END, reason
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[],
                           $7::text[], $8::text[], $9::text[], $10::float8[], $11::timestamptz[], $12::float8[],
                           $13::timestamptz[], $14::text[])
                    AS u(id, org, rule, dev, name, kind, sev, metric, state, v, fired, rv, rat, reason)""",
            *cols, evaluated_at)
    out_topics: list[str] = []
    out_payloads: list[bytes] = []
    hook_ids: list[int] = []
    hook_alerts: list[int] = []
    hook_bodies: list[str] = []
    for state, e in ch.events:
        if isinstance(e, NewAlert):
            alert_id, rule, device_id = e.id, e.rule, e.device_id
            fired_value, fired_at = e.value, e.fired_at
            if state == "firing":
                value, at, resolved_at, reason = e.value, e.fired_at, None, None
            else:
                assert e.resolved is not None
                value, at, reason = e.resolved
                resolved_at = at
        else:
            if e.alert_id not in stored:
                continue  # resolved meanwhile by someone else (e.g. the API): nothing changed here
            alert_id, rule, device_id = e.alert_id, e.rule, e.device_id
            fired_value, fired_at = stored[e.alert_id]
            value, at, resolved_at, reason = e.value, e.at, e.at, e.reason
        org, dev = where[device_id]
        out_topics.append(f"{topics.device_prefix(org, dev)}/alerts")
        out_payloads.append(alert_message(alert_id, rule.name, state, rule.severity, rule.metric, value, at))
        hooks = [h for h, sev in webhooks.get(rule.org_id, ()) if rule.severity in sev]
        if hooks:
            body = _encode(webhook_event(
                alert_id=alert_id, org=org, device=dev, rule=rule.name, rule_id=rule.id, kind=rule.kind,
                severity=rule.severity, metric=rule.metric, state=state, value=fired_value, fired_at=fired_at,
                resolved_at=resolved_at, resolved_value=value if state == "resolved" else None,
                resolved_reason=reason)).decode()
            for h in hooks:
                hook_ids.append(h)
                hook_alerts.append(alert_id)
                hook_bodies.append(body)
    written: list[OutboxMessage] = []
    if out_topics:
        written = [OutboxMessage(*r) for r in await conn.fetch(
            """INSERT INTO mqtt_outbox (topic, payload, publish_after)
               SELECT t, p, now() + $3 * interval '1 second' FROM unnest($1::text[], $2::bytea[]) AS u(t, p)
               RETURNING id, topic, payload""",
            out_topics, out_payloads, LEASE_S)]
    if hook_ids:
        await conn.execute(
            """INSERT INTO webhook_deliveries (webhook_id, alert_id, body)
               SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[])""",
            hook_ids, hook_alerts, hook_bodies)
    return written, len(hook_ids)


async def allocate_ids(conn: asyncpg.Connection, new: Sequence[NewAlert]) -> None:
    """Give the new alerts their ids before anything refers to them (``rule_state``, messages)."""
    if not new:
        return
    ids = await conn.fetch("SELECT nextval(pg_get_serial_sequence('alerts', 'id')) AS id "
                           "FROM generate_series(1, $1)", len(new))
    for a, r in zip(new, ids, strict=True):
        a.id = r["id"]


async def lock_rules(conn: asyncpg.Connection, ids: Iterable[int]) -> tuple[int, int]:
    """Share-lock the rules ``ids`` until the caller's transaction ends and return the cache
    counters (``rules_version``, ``device_directory_version``) read after the locks.

    What an evaluation knows of its rules (the cache, the sweep's query) was read before it
    locked anything. A change of a rule locks its row (the API: ``FOR UPDATE`` before
    anything else; any UPDATE or DELETE) and bumps ``rules_version`` in its transaction. So
    once these locks are held, a change of one of these rules either committed before - and
    the counter read here, in a later statement, shows it - or waits for the caller's commit.
    Equal counters: the rules as read are the rules as committed, for the whole transaction.
    Taken before the ``rule_state`` rows, in id order, as the API takes the rule and then its
    state rows: no cycle of waits."""
    await conn.execute("SELECT 1 FROM alert_rules WHERE id = ANY($1::bigint[]) ORDER BY id FOR SHARE",
                       sorted(ids))
    version, directory = await conn.fetchrow(VERSIONS_SQL)
    return version, directory


async def lock_pairs(conn: asyncpg.Connection, keys: list[tuple[int, int]]) -> dict[tuple[int, int], Any]:
    """Make sure the ``rule_state`` rows of ``keys`` (sorted) exist and lock them, in
    (rule_id, device_id) order: every bridge and the sweep take them in that one order."""
    rules = [k[0] for k in keys]
    devices = [k[1] for k in keys]
    await conn.execute(
        """INSERT INTO rule_state (rule_id, device_id)
           SELECT * FROM unnest($1::bigint[], $2::bigint[]) ORDER BY 1, 2 ON CONFLICT DO NOTHING""",
        rules, devices)
    rows = await conn.fetch(
        """SELECT s.* FROM rule_state s JOIN unnest($1::bigint[], $2::bigint[]) AS k(r, d)
               ON s.rule_id = k.r AND s.device_id = k.d
           ORDER BY s.rule_id, s.device_id FOR UPDATE OF s""",
        rules, devices)
    return {(r["rule_id"], r["device_id"]): r for r in rows}


async def write_states(conn: asyncpg.Connection, states: list[tuple[Any, ...]]) -> None:
    """``states``: (rule, device, last_ts, since, alert_id, cooldown_until, last_seen_at) rows."""
    if not states:
        return
    cols = list(zip(*states, strict=True))
    await conn.execute(
        """UPDATE rule_state s SET last_ts = u.last_ts, since = u.since, alert_id = u.alert_id,
               cooldown_until = u.cooldown_until, last_seen_at = u.last_seen_at
           FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::timestamptz[], $5::bigint[],
                       $6::timestamptz[], $7::timestamptz[])
                AS u(rule, dev, last_ts, since, alert_id, cooldown_until, last_seen_at)
           WHERE s.rule_id = u.rule AND s.device_id = u.dev""",
        *cols)


# -- the engine ---------------------------------------------------------------------------

class RuleEngine:
    """The rule cache and the evaluation of a batch (see the module docstring)."""

    def __init__(self, topics: TopicScheme, metrics: BridgeMetrics) -> None:
        self.topics = topics
        self.metrics = metrics
        self.snap = Snapshot()
        #: Called with the alert messages a commit wrote (bridge/outbox.py publishes them).
        self.on_outbox: Callable[[list[OutboxMessage]], None] | None = None
        #: Called after a commit that queued webhook deliveries (the sender's wake-up).
        self.on_deliveries: Callable[[], None] | None = None
        self._seen_written: dict[tuple[int, int], float] = {}
        self._lock = asyncio.Lock()

    # cache ---------------------------------------------------------------------------------

    async def refresh(self, conn: asyncpg.Connection, version: int, directory_version: int) -> None:
        """Reload what is cached when either counter moved (the store reads both before
        each batch, the sweep before each sweep)."""
        snap = self.snap
        if snap.version == version and snap.directory_version == directory_version:
            return
        async with self._lock:
            if self.snap.version == version and self.snap.directory_version == directory_version:
                return
            self.snap = await self._load(conn, version, directory_version)

    async def _load(self, conn: asyncpg.Connection, version: int, directory_version: int) -> Snapshot:
        rows = await conn.fetch(
            """SELECT id, org_id, name, kind, severity, metric, comparison, threshold, clear_threshold, duration_s,
                      cooldown_s, scope_kind, scope_device_id, scope_tag, scope_asset_id, created_at
               FROM alert_rules WHERE enabled""")
        snap = Snapshot(version=version, directory_version=directory_version)
        for r in rows:
            rule = Rule(**{**dict(r), "created_at": r["created_at"].timestamp()})
            snap.rules[rule.id] = rule
            if rule.kind == THRESHOLD:
                assert rule.metric is not None
                snap.by_metric.setdefault(rule.metric, []).append(rule)
            else:
                snap.timed = True
                if rule.kind == NO_DATA:
                    snap.no_data.append(rule)
        if snap.rules:
            for w in await conn.fetch("SELECT id, org_id, severities FROM webhooks WHERE enabled ORDER BY id"):
                snap.webhooks.setdefault(w["org_id"], []).append((w["id"], frozenset(w["severities"])))
        self.metrics.rules_loaded.set(len(snap.rules))
        self._seen_written.clear()
        log.info("rules loaded", extra={"rules": len(snap.rules), "version": version})
        return snap

    async def _facts(self, conn: asyncpg.Connection, snap: Snapshot, ids: Iterable[int]) -> None:
        missing = [i for i in ids if i not in snap.devices]
        if not missing:
            return
        rows = await conn.fetch(
            """SELECT d.id, d.org_id, o.slug AS org, d.slug, d.tags,
                      ARRAY(SELECT a.asset_id FROM device_assets a WHERE a.device_id = d.id) AS assets
               FROM devices d JOIN organizations o ON o.id = d.org_id WHERE d.id = ANY($1::bigint[])""",
            missing)
        for r in rows:
            snap.devices[r["id"]] = DeviceFacts(r["org_id"], r["org"], r["slug"], frozenset(r["tags"]),
                                                frozenset(r["assets"]))

    # evaluation ----------------------------------------------------------------------------

    async def evaluate(self, conn: asyncpg.Connection,
                       readings: list[tuple[datetime, int, str, float | None, str | None]],
                       seen: dict[int, float]) -> Evaluated | None:
        """Evaluate the rules on a batch's ``readings`` (``seen``: device -> newest receipt
        time) inside the caller's transaction; None when no rule is concerned.

        The cache was read before the transaction: a change of a rule may have committed
        since. So the rules the batch uses are locked first (:func:`lock_rules`), and if the
        versions read under those locks moved, the cache is reloaded and the batch planned
        again with the rules as committed (the rules kept from the first plan stay locked).
        Each round needs another change committed within the few milliseconds between a
        load and the lock."""
        snap = self.snap
        if not snap.rules:
            return None
        started = time.perf_counter()
        while True:
            plan = await self._plan(conn, snap, readings, seen)
            if plan is None:
                return None
            versions = await lock_rules(conn, {k[0] for k in plan.keys})
            if versions == (snap.version, snap.directory_version):
                break
            await self.refresh(conn, *versions)
            snap = self.snap
            if not snap.rules:
                return None
        pairs, seen_pairs, keys = plan.pairs, plan.seen_pairs, plan.keys
        devices = snap.devices
        out = Evaluated()
        rows = await lock_pairs(conn, keys)
        ch = Changes()
        states: list[tuple[Any, ...]] = []
        for key in keys:
            row = rows.get(key)
            if row is None:
                continue  # the device was deleted meanwhile (cascade)
            rule = snap.rules[key[0]]
            dev = key[1]
            alert: NewAlert | int | None = row["alert_id"]
            last_seen = row["last_seen_at"]
            s = PairState(_ts(row["last_ts"]), _ts(row["since"]), alert is not None, _ts(row["cooldown_until"]))
            if rule.kind == THRESHOLD:
                times, values, whens = pairs[key]
                changes, late = feed(rule, s, times, values)
                out.late += late
                for i, r in changes:
                    if r == FIRE:
                        alert = ch.fire(rule, dev, values[i], whens[i])
                    else:
                        assert alert is not None
                        ch.resolve(alert, rule, dev, values[i], whens[i], "condition cleared")
                        alert = None
            else:
                t = seen_pairs[key]
                if last_seen is None or t > last_seen.timestamp():
                    last_seen = _dt(t)
                if alert is not None:
                    ch.resolve(alert, rule, dev, None, _dt(t), "data again")
                    alert = None
                    s.cooldown_until = t + rule.cooldown_s
                out.seen_written[key] = t
            states.append((key[0], dev, s.last_ts, s.since, alert, s.cooldown_until, last_seen))
        await allocate_ids(conn, ch.new)
        now = datetime.now(UTC)
        await write_states(conn, [
            (r, d, None if lt is None else _dt(lt), None if si is None else _dt(si),
             a.id if isinstance(a, NewAlert) else a, None if cu is None else _dt(cu), ls)
            for r, d, lt, si, a, cu, ls in states])
        where = {d: (devices[d].org, devices[d].slug) for _, d in keys if d in devices}
        out.messages, out.deliveries = await write_changes(conn, ch, where, snap.webhooks, self.topics, now)
        out.fired = len(ch.new)
        out.resolved = sum(1 for state, _ in ch.events if state == "resolved")
        out.seconds = time.perf_counter() - started
        return out

    async def _plan(self, conn: asyncpg.Connection, snap: Snapshot,
                    readings: list[tuple[datetime, int, str, float | None, str | None]],
                    seen: dict[int, float]) -> Plan | None:
        """The (rule, device) pairs the batch gives work to under ``snap``'s rules: the
        readings of each threshold pair, the receipt time of each no-data pair; None if none."""
        by_metric = snap.by_metric
        # The readings of each (device, metric) that has rules on its metric.
        series: dict[tuple[int, str], list[tuple[datetime, float]]] = {}
        if by_metric:
            for when, dev, metric, value, _text in readings:
                if metric in by_metric and value is not None:
                    got = series.get((dev, metric))
                    if got is None:
                        series[(dev, metric)] = [(when, value)]
                    else:
                        got.append((when, value))
        telemetry: set[int] = {r[1] for r in readings} if snap.no_data else set()
        if not series and not telemetry:
            return None
        await self._facts(conn, snap, {k[0] for k in series} | telemetry)
        devices = snap.devices
        matched = snap.matched
        pairs: dict[tuple[int, int], tuple[list[float], list[float], list[datetime]]] = {}
        for (dev, metric), got in series.items():
            rules = matched.get((dev, metric))
            if rules is None:
                facts = devices.get(dev)
                rules = matched[(dev, metric)] = () if facts is None else tuple(
                    r for r in by_metric[metric] if in_scope(r, dev, facts))
            if not rules:
                continue
            got.sort()  # device-time order (a device's messages mostly come in order: cheap)
            whens = [w for w, _ in got]
            ordered = ([w.timestamp() for w in whens], [v for _, v in got], whens)
            for rule in rules:
                pairs[(rule.id, dev)] = ordered
        seen_pairs: dict[tuple[int, int], float] = {}
        written = self._seen_written
        for dev in telemetry:
            rules = snap.no_data_of.get(dev)
            if rules is None:
                facts = devices.get(dev)
                rules = snap.no_data_of[dev] = () if facts is None else tuple(
                    r for r in snap.no_data if in_scope(r, dev, facts))
            t = seen.get(dev)
            if t is None:
                continue
            for rule in rules:
                pkey = (rule.id, dev)
                if rule.duration_s >= SEEN_MIN_DURATION_S and t - written.get(pkey, 0.0) < SEEN_EVERY_S:
                    continue
                seen_pairs[pkey] = t
        if not pairs and not seen_pairs:
            return None
        return Plan(pairs, seen_pairs, sorted(pairs.keys() | seen_pairs.keys()))

    def committed(self, ev: Evaluated | None) -> None:
        """After the batch's commit: count, remember what was written, hand the alert
        messages to the outbox, wake the webhook sender."""
        if ev is None:
            return
        self._seen_written.update(ev.seen_written)
        self.metrics.rules_evaluated(ev)
        if ev.messages and self.on_outbox is not None:
            self.on_outbox(ev.messages)
        if ev.deliveries and self.on_deliveries is not None:
            self.on_deliveries()


# -- the no-data / offline sweep ------------------------------------------------------------

#: Fire candidates: pairs of enabled no-data and offline rules whose deadline has passed,
#: without a firing alert, out of cooldown; and firing offline alerts of devices back
#: online. One statement per sweep; it reads no pair that cannot be due (an offline rule
#: joins only offline devices).
SWEEP_SQL = """
WITH r AS (
    SELECT id, org_id, kind, duration_s, scope_kind, scope_device_id, scope_tag, scope_asset_id, created_at
    FROM alert_rules WHERE enabled AND kind IN ('no_data', 'offline')
), pairs AS (
    SELECT r.id AS rule_id, d.id AS device_id, r.kind, r.duration_s,
           greatest(r.created_at, d.created_at) AS start, d.status, d.status_changed_at
    FROM r JOIN devices d ON d.org_id = r.org_id AND d.enabled
         AND (r.kind = 'no_data' OR d.status = 'offline')
    WHERE r.scope_kind = 'org'
       OR (r.scope_kind = 'device' AND d.id = r.scope_device_id)
       OR (r.scope_kind = 'tag' AND r.scope_tag = ANY (d.tags))
       OR (r.scope_kind = 'asset' AND EXISTS (
               SELECT 1 FROM device_assets a WHERE a.asset_id = r.scope_asset_id AND a.device_id = d.id))
)
SELECT p.rule_id, p.device_id, p.kind, p.duration_s, p.start, p.status_changed_at, NULL::bigint AS alert_id
FROM pairs p LEFT JOIN rule_state s ON s.rule_id = p.rule_id AND s.device_id = p.device_id
WHERE s.alert_id IS NULL
  AND (s.cooldown_until IS NULL OR s.cooldown_until <= $1)
  AND CASE WHEN p.kind = 'no_data'
           THEN coalesce(s.last_seen_at, p.start) + make_interval(secs => p.duration_s) <= $1
           ELSE greatest(p.status_changed_at, p.start) + make_interval(secs => p.duration_s) <= $1
                AND (s.last_ts IS NULL OR s.last_ts < p.status_changed_at)
      END
UNION ALL
SELECT s.rule_id, s.device_id, 'online', 0, NULL, d.status_changed_at, s.alert_id
FROM rule_state s JOIN alert_rules ar ON ar.id = s.rule_id AND ar.kind = 'offline'
     JOIN devices d ON d.id = s.device_id
WHERE s.alert_id IS NOT NULL AND d.status <> 'offline'
"""


class _RulesChanged(Exception):
    """A sweep round's rules changed before it locked them: the round is given up."""


class RuleSweeper:
    """Fires no-data and offline alerts on time, resolves offline alerts (module docstring)."""

    def __init__(self, pool: asyncpg.Pool, engine: RuleEngine, metrics: BridgeMetrics,
                 interval: float = SWEEP_S) -> None:
        self.pool = pool
        self.engine = engine
        self.metrics = metrics
        self.interval = interval
        #: rules_version when the firing alerts were last checked against their scopes
        self._scope_checked: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every interval until ``stop``. A failed sweep is logged and tried again at
        the next interval: the sweep must never take the ingest down with it."""
        while not stop.is_set():
            try:
                await self.sweep()
                await self.left_scope()
            except DatabaseUnavailable as exc:
                log.warning("rule sweep failed (%s); retrying", exc)
            except StorageError:
                self.metrics.rule_errors.inc()
                log.exception("rule sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def sweep(self) -> Evaluated | None:
        """One sweep; None when there was nothing to do or another bridge holds the lock. A
        round that finds a rule of its candidates changed since its query is given up and
        the sweep starts again (:func:`lock_rules`)."""
        try:
            async with self.pool.acquire() as conn:
                while True:
                    version, directory = await conn.fetchrow(VERSIONS_SQL)
                    await self.engine.refresh(conn, version, directory)
                    if not self.engine.snap.timed and not await self._offline_firing(conn):
                        return None
                    try:
                        async with conn.transaction():
                            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK):
                                return None
                            ev = await self._sweep(conn, (version, directory))
                        break
                    except _RulesChanged:
                        continue
        except Exception as exc:
            raise translate(exc) from exc
        if ev is not None:
            self.engine.committed(ev)
        return ev

    async def left_scope(self) -> int:
        """Resolve the firing alerts of devices no longer in their rule's scope (a tag
        removed, a device taken off an asset): no batch evaluates such a pair again, so
        nothing else would. Looked for only when ``rules_version`` moved (every change of
        tags, assets and rules bumps it); returns how many were resolved."""
        try:
            async with self.pool.acquire() as conn:
                version = await conn.fetchval("SELECT n FROM rules_version")
                if version == self._scope_checked:
                    return 0
                async with conn.transaction():
                    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK):
                        return 0
                    found = await conn.fetch(LEFT_SCOPE_SQL)
                    resolved: list[int] = []
                    if found:
                        # Rule, then its state rows, as every other writer of them (lock_rules).
                        await lock_rules(conn, {r["rule_id"] for r in found})
                        keys = sorted((r["rule_id"], r["device_id"]) for r in found)
                        rows = await conn.fetch(
                            LEFT_SCOPE_SQL + """ AND (s.rule_id, s.device_id) IN
                                   (SELECT * FROM unnest($1::bigint[], $2::bigint[]))
                               ORDER BY s.rule_id, s.device_id FOR UPDATE OF s""",
                            [k[0] for k in keys], [k[1] for k in keys])
                        resolved = [r["alert_id"] for r in rows]
                        if resolved:
                            await conn.execute(
                                """UPDATE alerts SET state = 'resolved', resolved_at = now(),
                                          resolved_evaluated_at = now(), resolved_reason = $2
                                   WHERE id = ANY($1::bigint[]) AND state = 'firing'""",
                                resolved, "device left the rule's scope")
                            await conn.execute(
                                """DELETE FROM rule_state s USING unnest($1::bigint[], $2::bigint[]) AS u(r, d)
                                   WHERE s.rule_id = u.r AND s.device_id = u.d""",
                                [r["rule_id"] for r in rows], [r["device_id"] for r in rows])
                            await write_notifications(conn, resolved, self.engine.topics)
                self._scope_checked = version
        except Exception as exc:
            raise translate(exc) from exc
        if resolved:
            self.metrics.alerts_resolved.inc(len(resolved))
            log.info("resolved %d alert(s) of devices that left their rule's scope", len(resolved))
        return len(resolved)

    @staticmethod
    async def _offline_firing(conn: asyncpg.Connection) -> bool:
        """Offline alerts still firing of rules disabled since: they resolve when the
        device is back (one index probe)."""
        return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM rule_state WHERE alert_id IS NOT NULL "
                                        "AND rule_id IN (SELECT id FROM alert_rules WHERE kind = 'offline'))"))

    async def _sweep(self, conn: asyncpg.Connection, versions: tuple[int, int]) -> Evaluated | None:
        """One round in the caller's transaction; ``versions``: the cache counters read before
        it (the rules the cache and :data:`SWEEP_SQL` read are those of that moment, or newer)."""
        started = time.perf_counter()
        now = datetime.now(UTC)
        found = await conn.fetch(SWEEP_SQL, now)
        if not found:
            return None
        candidates = {(r["rule_id"], r["device_id"]): r for r in found}
        keys = sorted(candidates)
        if await lock_rules(conn, {k[0] for k in keys}) != versions:
            raise _RulesChanged
        rows = await lock_pairs(conn, keys)
        rules = await self._rules(conn, {k[0] for k in keys})
        ch = Changes()
        states: list[tuple[Any, ...]] = []
        for key in keys:
            c, row, rule = candidates[key], rows.get(key), rules.get(key[0])
            if row is None or rule is None:
                continue
            last_ts, cooldown = row["last_ts"], row["cooldown_until"]
            alert: NewAlert | int | None = row["alert_id"]
            if c["kind"] == "online":
                if alert is None or alert != c["alert_id"]:
                    continue  # resolved meanwhile
                at = c["status_changed_at"] or now
                ch.resolve(alert, rule, key[1], None, at, "online again")
                alert, cooldown = None, at + (rule.cooldown_s * _SECOND)
            else:
                if alert is not None or (cooldown is not None and cooldown > now):
                    continue
                dur = rule.duration_s * _SECOND
                if c["kind"] == "no_data":
                    # Read again under the lock: a batch may have brought telemetry meanwhile.
                    deadline = (row["last_seen_at"] or c["start"]) + dur
                else:
                    deadline = max(c["status_changed_at"], c["start"]) + dur
                    last_ts = c["status_changed_at"]  # one alert per offline episode
                if deadline > now:
                    continue
                alert = ch.fire(rule, key[1], None, deadline)
            states.append((key[0], key[1], last_ts, row["since"], alert, cooldown, row["last_seen_at"]))
        if not states:
            return None
        await allocate_ids(conn, ch.new)
        await write_states(conn, [(r, d, lt, si, a.id if isinstance(a, NewAlert) else a, cu, ls)
                                  for r, d, lt, si, a, cu, ls in states])
        where = {r["id"]: (r["org"], r["slug"]) for r in await conn.fetch(
            "SELECT d.id, o.slug AS org, d.slug FROM devices d JOIN organizations o ON o.id = d.org_id "
            "WHERE d.id = ANY($1::bigint[])", list({k[1] for k in keys}))}
        out = Evaluated(fired=len(ch.new), resolved=sum(1 for s, _ in ch.events if s == "resolved"))
        out.messages, out.deliveries = await write_changes(conn, ch, where, self.engine.snap.webhooks,
                                                           self.engine.topics, now)
        out.seconds = time.perf_counter() - started
        return out

    async def _rules(self, conn: asyncpg.Connection, ids: set[int]) -> dict[int, Rule]:
        """The rules of the candidates: from the cache, or read (a rule disabled since the
        alert it resolves fired is no longer cached)."""
        cached = self.engine.snap.rules
        out = {i: cached[i] for i in ids if i in cached}
        missing = [i for i in ids if i not in out]
        if missing:
            for r in await conn.fetch(
                    """SELECT id, org_id, name, kind, severity, metric, comparison, threshold, clear_threshold,
                              duration_s, cooldown_s, scope_kind, scope_device_id, scope_tag, scope_asset_id,
                              created_at FROM alert_rules WHERE id = ANY($1::bigint[])""", missing):
                out[r["id"]] = Rule(**{**dict(r), "created_at": r["created_at"].timestamp()})
        return out


_SECOND = timedelta(seconds=1)

#: Firing alerts whose device is no longer in its rule's scope (RuleSweeper.left_scope).
LEFT_SCOPE_SQL = """SELECT s.rule_id, s.device_id, s.alert_id FROM rule_state s
    JOIN alert_rules r ON r.id = s.rule_id JOIN devices d ON d.id = s.device_id
    WHERE s.alert_id IS NOT NULL AND NOT (
        (r.scope_kind = 'org' AND d.org_id = r.org_id)
        OR (r.scope_kind = 'device' AND d.id = r.scope_device_id)
        OR (r.scope_kind = 'tag' AND d.org_id = r.org_id AND r.scope_tag = ANY (d.tags))
        OR (r.scope_kind = 'asset' AND EXISTS (SELECT 1 FROM device_assets a
                                               WHERE a.asset_id = r.scope_asset_id AND a.device_id = d.id)))"""

#: Both cache counters in one round trip (the store reads them before each batch).
VERSIONS_SQL = "SELECT (SELECT n FROM rules_version), (SELECT n FROM device_directory_version)"
