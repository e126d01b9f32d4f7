"""Command lifecycle, the bridge's half: a device's ``commands/{id}/result`` moves its command.

States and replies are lms_core/commands.py's (shared with the API). What one reply does,
in the order the bridge received them (:func:`apply_reply`, pure):

=====================================  =====================================================
reply, received at ``at``              effect
=====================================  =====================================================
any, on an open command, after         ``expired``, finished at ``expires_at`` (the reply
``expires_at``                         came too late to count)
``accepted``/``in_progress`` on        ``delivered`` at ``at``; on ``delivered`` it stays so
``pending``
``ok``/``error`` on an open command    ``succeeded``/``failed``, finished at ``at``
any, on a final state                  state unchanged, the reply recorded beside it (a late
                                       result of a cancelled command is kept)
any, once a final reply is recorded    ignored: the first ``ok``/``error`` stays (a
                                       redelivery, or a progress reply overtaken by it)
=====================================  =====================================================

:func:`record_replies` applies a batch's replies inside the batch's transaction: it locks
the commands' rows, refuses replies to commands that do not exist or are another device's
(the store quarantines them), writes every change with one ``UPDATE`` and notifies
:data:`~lms_core.commands.NOTIFY_CHANNEL` with each changed id, so API processes waiting
on a command learn of it at commit and never before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from bridge.decode import CommandReply
from lms_core.commands import FINAL_REPLIES, NOTIFY_CHANNEL, OPEN_STATES

#: Outcomes of one reply (the ``outcome`` label of ``lms_bridge_command_replies_total``).
#: Moved the state: delivered, succeeded, failed, expired. Recorded beside an unchanged state:
#: recorded. Dropped: ignored. Refused (quarantined): unknown_command, other_device.
UNKNOWN_COMMAND = "unknown_command"
OTHER_DEVICE = "other_device"
IGNORED = "ignored"
RECORDED = "recorded"


@dataclass(slots=True)
class Tracked:
    """One command row as the replies of a batch leave it (locked ``FOR UPDATE`` meanwhile)."""

    state: str
    expires_at: datetime
    reply_status: str | None
    #: Set when a reply delivered or finished it (written only where the row has none).
    delivered_at: datetime | None = None
    finished_at: datetime | None = None
    #: The reply to write: (status, received at, result JSON text, error).
    reply: tuple[str, datetime, str | None, str | None] | None = None


def apply_reply(c: Tracked, status: str, result: str | None, error: str | None, at: datetime) -> str:
    """Apply one reply received at ``at`` to ``c``; return its outcome (module docstring)."""
    if c.reply_status in FINAL_REPLIES:
        return IGNORED
    if c.state in OPEN_STATES:
        if at > c.expires_at:
            c.state, c.finished_at = "expired", c.expires_at
            outcome = c.state
        elif status in FINAL_REPLIES:
            c.state, c.finished_at = FINAL_REPLIES[status], at
            outcome = c.state
        elif c.state == "pending":
            c.state, c.delivered_at = "delivered", at
            outcome = c.state
        else:
            outcome = RECORDED
    else:
        outcome = RECORDED
    c.reply_status = status
    c.reply = (status, at, result, error)
    return outcome


@dataclass
class RepliesWritten:
    """What :func:`record_replies` did: outcomes counted, and the replies it refused."""

    outcomes: dict[str, int] = field(default_factory=dict)
    #: (index into the replies given, reason): for quarantine.
    refused: list[tuple[int, str]] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)


async def record_replies(conn: asyncpg.Connection,
                         replies: list[tuple[int, CommandReply, float]]) -> RepliesWritten:
    """Apply ``replies`` - (device id, reply, received at in epoch seconds), in the order
    received - inside the caller's transaction on ``conn``."""
    out = RepliesWritten()
    ids = sorted({r.command_id for _, r, _ in replies})
    # One lock order (by id) for every bridge; a concurrent cancel waits for this commit.
    rows = await conn.fetch(
        """SELECT id, device_id, state, expires_at, reply_status FROM commands
           WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE""", ids)
    found = {r["id"]: r for r in rows}
    tracked: dict[int, Tracked] = {}
    outcomes = out.outcomes
    for i, (device_id, reply, received_at) in enumerate(replies):
        cid = reply.command_id
        row = found.get(cid)
        if row is None:
            out.refused.append((i, f"unknown command {cid}"))
            outcome = UNKNOWN_COMMAND
        elif row["device_id"] != device_id:
            out.refused.append((i, f"command {cid} belongs to another device"))
            outcome = OTHER_DEVICE
        else:
            c = tracked.get(cid)
            if c is None:
                c = tracked[cid] = Tracked(row["state"], row["expires_at"], row["reply_status"])
            outcome = apply_reply(c, reply.status, reply.result, reply.error,
                                  datetime.fromtimestamp(received_at, UTC))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    changes = [(cid, c) for cid, c in sorted(tracked.items()) if c.reply is not None]
    if not changes:
        return out
    cols: tuple[list[object], ...] = tuple([] for _ in range(8))
    for cid, c in changes:
        assert c.reply is not None
        for col, v in zip(cols, (cid, c.state, c.delivered_at, c.finished_at, *c.reply), strict=True):
            col.append(v)
    await conn.execute(
        """UPDATE commands c SET state = u.state,
               delivered_at = COALESCE(c.delivered_at, u.delivered_at),
               finished_at = COALESCE(c.finished_at, u.finished_at),
               reply_status = u.reply_status, reply_at = u.reply_at, result = u.result::jsonb, error = u.error
           FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[],
                       $6::timestamptz[], $7::text[], $8::text[])
                AS u(id, state, delivered_at, finished_at, reply_status, reply_at, result, error)
           WHERE c.id = u.id""",
        *cols,
    )
    out.changed = [cid for cid, _ in changes]
    await conn.execute("SELECT pg_notify($1, id::text) FROM unnest($2::bigint[]) AS id", NOTIFY_CHANNEL,
                       out.changed)
    return out
