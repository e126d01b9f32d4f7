"""Alert rules and alerts, the parts the bridge (which evaluates) and the API (which manages
rules, shows alerts and webhooks) share: names, limits and the messages on the wire.

Migration 0007 holds the tables; DESIGN.md the alert topic
``{root}/{org}/{device}/alerts`` (cloud -> subscribers, QoS 1).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any

import msgspec

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
