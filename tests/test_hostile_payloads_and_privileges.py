"""Payload and provisioning attacks that do not disturb the shared stack's bridge."""

from __future__ import annotations

import asyncio
import json

from lms_core.broker import PLATFORM_ROLE, BrokerAdmin, device_rolename, device_username
from lms_core.topics import TopicScheme
from tests.harness import Device, Stack, wait_until


def _rows(s: Stack, org: str, dev: str) -> list:
    return s.query(
        "SELECT metric, value FROM readings r JOIN devices d ON d.id = r.device_id "
        "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = $2 ORDER BY value", org, dev)


def test_flattened_name_collision_is_quarantined_not_silently_dropped(stack: Stack, unique: str) -> None:
    """``{"a.b": 1, "a": {"b": 2}}`` flattens to two readings with the same (device, metric,
    time). The COPY fails on the unique index, the batch goes through ON CONFLICT DO NOTHING
    (and the bridge stays on the slower de-duplicating path for 30 s), and one of the two
    values disappears without a trace."""
    dev = Device(stack.mq.port, stack.create_device(unique, "col"))
    assert dev.connect().value == 0
    dev.publish_wait("telemetry", json.dumps({"a.b": 1, "a": {"b": 2}}))
    dev.publish_wait("telemetry", json.dumps({"marker": 1}))
    wait_until(lambda: any(r["metric"] == "marker" for r in _rows(stack, unique, "col")), 10, "marker")
    dev.close()
    quarantined = stack.scalar("SELECT count(*) FROM quarantine WHERE org_slug = $1 AND device_slug = 'col'", unique)
    rows = [(r["metric"], r["value"]) for r in _rows(stack, unique, "col") if r["metric"] != "marker"]
    # Either the ambiguous message is quarantined, or nothing was silently lost.
    assert quarantined == 1 or len(rows) == 2, f"rows {rows}, quarantined {quarantined}"


async def _admin(stack: Stack, commands: list[dict]) -> list[dict]:
    async with BrokerAdmin(stack.mqtt_url, TopicScheme()) as admin:
        return await admin.execute(commands)


async def _client(stack: Stack, username: str) -> dict:
    async with BrokerAdmin(stack.mqtt_url, TopicScheme()) as admin:
        (resp,) = await admin.execute([{"command": "getClient", "username": username}])
        return resp["data"]["client"]


def test_reconcile_removes_extra_roles_from_a_device_client(stack: Stack, unique: str) -> None:
    """reconcile only checks that the device role is *among* the client's roles: a device
    client that was given ``lms-platform`` (all of lms/#, by mistake or by an attacker with
    broker admin access for a moment) keeps it forever."""
    stack.create_device(unique, "dev")
    user = device_username(unique, "dev")
    asyncio.run(_admin(stack, [{"command": "addClientRole", "username": user, "rolename": PLATFORM_ROLE}]))
    try:
        asyncio.run(stack._provision("reconcile"))
        roles = sorted(r["rolename"] for r in asyncio.run(_client(stack, user))["roles"])
        assert roles == [device_rolename(unique, "dev")]
    finally:
        asyncio.run(_admin(stack, [{"command": "removeClientRole", "username": user, "rolename": PLATFORM_ROLE}]))


def test_reconcile_removes_a_device_client_from_groups(stack: Stack, unique: str) -> None:
    """Same through a dynamic-security group: reconcile never looks at groups."""
    stack.create_device(unique, "dev")
    user = device_username(unique, "dev")
    group = f"review-{unique}"
    asyncio.run(_admin(stack, [
        {"command": "createGroup", "groupname": group, "roles": [{"rolename": PLATFORM_ROLE}]},
        {"command": "addGroupClient", "groupname": group, "username": user},
    ]))
    try:
        asyncio.run(stack._provision("reconcile"))
        groups = [g["groupname"] for g in asyncio.run(_client(stack, user)).get("groups", [])]
        assert groups == []
    finally:
        asyncio.run(_admin(stack, [{"command": "deleteGroup", "groupname": group}]))
