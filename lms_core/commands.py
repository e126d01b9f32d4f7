"""Cloud to device, the parts the bridge and the API share: command states, the payloads
on the wire, and the channel on which the bridge tells API processes a command changed.

Topics (DESIGN.md): ``{root}/{org}/{device}/commands/{id}`` (cloud -> device, QoS 1, MQTT 5
message expiry = TTL), ``.../commands/{id}/result`` (device -> cloud), ``.../config``
(cloud -> device, retained) and ``.../config/reported`` (device -> cloud).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import msgspec

#: Lifecycle: pending -> delivered -> succeeded | failed, or expired, or cancelled.
OPEN_STATES = ("pending", "delivered")
FINAL_STATES = ("succeeded", "failed", "expired", "cancelled")
STATES = OPEN_STATES + FINAL_STATES

#: What a device may answer (``commands/{id}/result``), and what each does to an open command.
PROGRESS_REPLIES = ("accepted", "in_progress")   # -> delivered
FINAL_REPLIES = {"ok": "succeeded", "error": "failed"}
REPLIES = PROGRESS_REPLIES + tuple(FINAL_REPLIES)

#: PostgreSQL NOTIFY channel: the bridge notifies the id of every command whose state or
#: reply it changed, in the transaction that changed it (so at commit, never before).
#: API processes waiting on a command (``?wait=``) listen; nothing else depends on it.
NOTIFY_CHANNEL = "lms_commands"

#: A command id as it appears in a topic: the decimal id of its row.
COMMAND_ID_RE = re.compile(r"[1-9][0-9]{0,18}")
#: A command's name: what the firmware dispatches on.
COMMAND_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$"

_encode = msgspec.json.Encoder().encode


def command_payload(command_id: int, name: str, params: Any, expires_at: datetime) -> bytes:
    """What a device receives on ``commands/{id}``. ``expires_at`` is epoch milliseconds,
    like telemetry's ``ts``: MQTT 3.1.1 devices (MicroPython's umqtt) do not see the MQTT 5
    message expiry, so the firmware compares it with its NTP clock and refuses a stale one."""
    return _encode({"id": command_id, "name": name, "params": params,
                    "expires_at": int(expires_at.timestamp() * 1000)})


def config_payload(version: int, desired: dict[str, Any]) -> bytes:
    """The retained desired configuration: ``{"version": n, ...}``."""
    return _encode({**desired, "version": version})
