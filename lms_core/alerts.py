"""Alert rules and alerts, the parts the bridge (which evaluates) and the API (which manages
rules, shows alerts and webhooks) share: names, limits and the messages on the wire.

Migration 0007 holds the tables; DESIGN.md the alert topic
``{root}/{org}/{device}/alerts`` (cloud -> subscribers, QoS 1).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from lms_core.topics import TopicScheme

KINDS = ("threshold", "no_data", "offline")
COMPARISONS = (">", ">=", "<", "<=", "==", "!=")
SEVERITIES = ("critical", "major", "minor", "warning", "info")
SCOPES = ("device", "tag", "asset", "org")
#: Comparisons whose clear threshold, if any, must lie below the threshold (the alert clears
#: when the value falls under it), and those where it must lie above.
CLEAR_BELOW = (">", ">=")
CLEAR_ABOVE = ("<", "<=")

#: Webhook request headers.
SIGNATURE_HEADER = "X-LMS-Signature"
TIMESTAMP_HEADER = "X-LMS-Timestamp"
#: The delivery's id, the same on each attempt of it: deliveries are at least once (an attempt
#: whose answer was lost is made again), so a receiver de-duplicates on it.
DELIVERY_HEADER = "X-LMS-Delivery"

_encode = msgspec.json.Encoder().encode


def alert_message(alert_id: int, rule: str, state: str, severity: str, metric: str | None, value: float | None,
                  ts: datetime) -> bytes:
    """The payload on ``{root}/{org}/{device}/alerts`` (DESIGN.md); ``ts`` in epoch ms, the
    device time of the change."""
    return _encode({"alert_id": alert_id, "rule": rule, "state": state, "severity": severity, "metric": metric,
                    "value": value, "ts": int(ts.timestamp() * 1000)})


def webhook_body(event: dict[str, Any], timestamp: int) -> bytes:
    """A webhook request's JSON body for one attempt: the stored ``event`` plus the attempt's
    ``timestamp`` (epoch seconds, also sent as the X-LMS-Timestamp header). The signature
    covers the whole body, so it covers the timestamp: a receiver that checks the signature
    and refuses a timestamp older than a few minutes refuses replays."""
    return _encode({**event, "timestamp": timestamp})


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the body with the webhook's secret (X-LMS-Signature)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_event(*, alert_id: int, org: str, device: str, rule: str, rule_id: int | None, kind: str,
                  severity: str, metric: str | None, state: str, value: float | None, fired_at: datetime,
                  resolved_at: datetime | None, resolved_value: float | None,
                  resolved_reason: str | None) -> dict[str, Any]:
    """The stored event of a webhook delivery (``webhook_deliveries.body``, as JSON text), the
    one shape whoever changed the alert (the bridge's rules, the API deleting a rule)."""
    return {"event": f"alert.{state}", "alert": {
        "id": alert_id, "org": org, "device": device, "rule": rule, "rule_id": rule_id, "kind": kind,
        "severity": severity, "metric": metric, "state": state, "value": value, "fired_at": fired_at,
        "resolved_at": resolved_at, "resolved_value": resolved_value, "resolved_reason": resolved_reason}}


def webhook_event_of(alert: Any, org: str, device: str) -> dict[str, Any]:
    """:func:`webhook_event` of an ``alerts`` row (a mapping by column)."""
    return webhook_event(alert_id=alert["id"], org=org, device=device, rule=alert["rule_name"],
                         rule_id=alert["rule_id"], kind=alert["kind"], severity=alert["severity"],
                         metric=alert["metric"], state=alert["state"], value=alert["value"],
                         fired_at=alert["fired_at"], resolved_at=alert["resolved_at"],
                         resolved_value=alert["resolved_value"], resolved_reason=alert["resolved_reason"])


_CHANGED = """SELECT a.*, o.slug AS org, d.slug AS device FROM alerts a
              JOIN organizations o ON o.id = a.org_id JOIN devices d ON d.id = a.device_id
              WHERE a.id = ANY($1::bigint[]) ORDER BY a.id"""


async def write_notifications(conn: Any, alert_ids: Sequence[int], topics: TopicScheme) -> None:
    """Queue the notifications of the alerts' current states, in the caller's transaction
    (that of the change): its message on ``{root}/{org}/{device}/alerts`` (``mqtt_outbox``)
    and a delivery for each enabled webhook of its organization that takes its severity
    (``webhook_deliveries``). ``conn`` is an asyncpg connection."""
    rows = await conn.fetch(_CHANGED, list(alert_ids))
    if not rows:
        return
    messages = []
    for r in rows:
        resolved = r["state"] == "resolved"
        payload = alert_message(r["id"], r["rule_name"], r["state"], r["severity"], r["metric"],
                                r["resolved_value"] if resolved else r["value"],
                                r["resolved_at"] if resolved else r["fired_at"])
        messages.append((f"{topics.device_prefix(r['org'], r['device'])}/alerts", payload))
    await conn.executemany("INSERT INTO mqtt_outbox (topic, payload) VALUES ($1, $2)", messages)
    await conn.execute(
        """INSERT INTO webhook_deliveries (webhook_id, alert_id, body)
           SELECT w.id, e.alert_id, e.body
           FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) AS e(alert_id, org_id, severity, body)
           JOIN webhooks w ON w.org_id = e.org_id AND w.enabled AND e.severity = ANY (w.severities)""",
        [r["id"] for r in rows], [r["org_id"] for r in rows], [r["severity"] for r in rows],
        [_encode(webhook_event_of(r, r["org"], r["device"])).decode() for r in rows])
