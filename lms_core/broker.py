"""Broker administration through Mosquitto's dynamic-security plugin.

Accounts:

* the platform service account (``lms-service`` by default) holds role ``lms-admin``
  (the ``$CONTROL/dynamic-security`` API) and role ``lms-platform`` (all of
  ``{root}/#``, shared subscriptions included). The bridge and the API use it.
* a device ``{org}/{device}`` gets client ``{org}.{device}`` whose MQTT client id is
  pinned to the same string, and role ``device.{org}.{device}`` whose ACL allows exactly
  its own topics (DESIGN.md). '.' cannot occur in a slug, so names never collide.
* a technician login ``tech.{org}.{n}`` holds role ``tech.{org}`` (subscribe to the
  organization's topics) and its client id is pinned to its username.
* the watch login (``lms-watch``, made by ``lms up``) holds role ``lms-watch``: subscribe to
  ``{root}/#`` and nothing else; its client id is pinned to its username.

Every login the platform hands out is pinned to its own client id. Mosquitto gives an
existing session to whoever connects with its client id, so a login free to choose its id
could take over the bridge's persistent session (acknowledging, so losing, its backlog) or
a device's. The service account alone is not pinned: the bridge (one id per process), the
API and administration commands use it under several ids, and it administers the broker
anyway (it could create any login it wanted). It is the platform's own secret and is
never handed to people.

The database is the source of truth; :meth:`lms_core.provisioning.Provisioner.reconcile` brings the
broker in line with it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lms_core.errors import BrokerError
from lms_core.mqtt import AsyncMqttClient
from lms_core.settings import MqttUrl
from lms_core.topics import SLUG, TopicScheme

log = logging.getLogger("lms.broker")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
ADMIN_ROLE = "lms-admin"
PLATFORM_ROLE = "lms-platform"
DEVICE_ROLE_PREFIX = "device."
WATCH_ROLE = "lms-watch"
WATCH_USER = "lms-watch"


def device_username(org: str, device: str) -> str:
    return f"{org}.{device}"


def device_rolename(org: str, device: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{org}.{device}"


_DEVICE_USER = re.compile(rf"{SLUG}\.{SLUG}")


def is_device_client(username: str, roles: tuple[str, ...]) -> bool:
    """A client the platform made for a device: ``org.device`` holding a ``device.`` role.
    Clients made by hand (``jane.doe`` without such a role) are never touched."""
    return bool(_DEVICE_USER.fullmatch(username)) and any(r.startswith(DEVICE_ROLE_PREFIX) for r in roles)


TECH_ROLE_PREFIX = "tech."


def tech_rolename(org: str) -> str:
    return f"{TECH_ROLE_PREFIX}{org}"


def tech_acls(topics: TopicScheme, org: str) -> list[dict[str, Any]]:
    """A field technician's ACL: subscribe (and so read) everything of one organization,
    publish nothing (the default ACL denies it)."""
    return [{"acltype": "subscribePattern", "topic": f"{topics.root}/{org}/#", "priority": 0, "allow": True}]


def watch_acls(topics: TopicScheme) -> list[dict[str, Any]]:
    """The watch login's ACL: subscribe (and so read) every platform topic, publish nothing."""
    return [{"acltype": "subscribePattern", "topic": f"{topics.root}/#", "priority": 0, "allow": True}]


def device_acls(topics: TopicScheme, org: str, device: str) -> list[dict[str, Any]]:
    """The ACL of one device: publish its own device->cloud topics, subscribe its own
    commands and config, nothing else (the default ACL denies the rest)."""
    acls: list[dict[str, Any]] = []
    for topic in topics.device_publish_topics(org, device):
        acls.append({"acltype": "publishClientSend", "topic": topic, "priority": 0, "allow": True})
    for topic in topics.device_subscribe_filters(org, device):
        acls.append({"acltype": "subscribePattern", "topic": topic, "priority": 0, "allow": True})
    return acls


def platform_acls(topics: TopicScheme) -> list[dict[str, Any]]:
    everything = f"{topics.root}/#"
    # The plugin checks a shared subscription with its "$share/<group>/" prefix.
    shared = f"$share/+/{topics.root}/#"
    acls = [
        {"acltype": t, "topic": everything, "priority": 0, "allow": True}
        for t in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
    ]
    acls += [
        {"acltype": t, "topic": shared, "priority": 0, "allow": True}
        for t in ("subscribePattern", "unsubscribePattern")
    ]
    return acls


def _hash_password(password: str, iterations: int = 101) -> dict[str, Any]:
    # The plugin's own format (PBKDF2-SHA512, base64 salt and hash). 101 iterations is
    # what the broker itself uses for clients created through the API; every password
    # the platform issues is 32 random characters, so the count adds nothing to them.
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def bootstrap_config(service_user: str, service_password: str, topics: TopicScheme) -> dict[str, Any]:
    """The first ``dynamic-security.json``: the service account and its two roles.

    The default ACL access denies publishing and subscribing to anything not granted by a
    role; receiving is allowed so that a role's subscriptions are the only gate.
    """
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {
                "username": service_user,
                "textname": "LMS platform service account",
                "roles": [{"rolename": ADMIN_ROLE}, {"rolename": PLATFORM_ROLE}],
                **_hash_password(service_password),
            }
        ],
        "groups": [],
        "roles": [
            {
                "rolename": ADMIN_ROLE,
                "textname": "dynamic-security administration",
                "acls": [
                    {"acltype": t, "topic": "$CONTROL/dynamic-security/#", "priority": 0, "allow": True}
                    for t in ("publishClientSend", "publishClientReceive", "subscribePattern")
                ]
                + [
                    {"acltype": t, "topic": "$SYS/#", "priority": 0, "allow": True}
                    for t in ("publishClientReceive", "subscribePattern")
                ],
            },
            {
                "rolename": PLATFORM_ROLE,
                "textname": "bridge and API: all platform topics",
                "acls": platform_acls(topics),
            },
        ],
    }


def write_bootstrap(path: str, service_user: str, service_password: str, topics: TopicScheme) -> None:
    """Write the bootstrap file with mode 0600 (it holds the service account's hash)."""
    data = json.dumps(bootstrap_config(service_user, service_password, topics), indent=2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def add_devices_offline(path: str, topics: TopicScheme, devices: list[tuple[str, str, str]]) -> None:
    """Add device logins ``(org, device, password)`` to the dynamic-security file of a broker
    that is **not running**; it reads them all at its next start. For fleets of thousands
    (bench/fleet.py): through the running plugin, which rewrites its whole file after each
    command, ten thousand devices take the better part of an hour."""
    with open(path) as f:
        config = json.load(f)
    for org, device, password in devices:
        user, role = device_username(org, device), device_rolename(org, device)
        config["roles"].append({"rolename": role, "acls": device_acls(topics, org, device)})
        config["clients"].append({"username": user, "clientid": user, "textname": f"device {org}/{device}",
                                  "roles": [{"rolename": role}], **_hash_password(password)})
    with open(path, "w") as f:  # in place: the file keeps the broker user as its owner
        json.dump(config, f)


@dataclass(frozen=True, slots=True)
class BrokerClient:
    username: str
    disabled: bool
    roles: tuple[str, ...]
    clientid: str | None
    groups: tuple[str, ...] = ()


class DynsecError(BrokerError):
    """The plugin answered a command with an error."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"broker refused {command}: {error}")
        self.command = command
        self.error = error


class BrokerAdmin:
    """Request/response client of the dynamic-security API. Use ``async with``."""

    def __init__(self, url: MqttUrl, topics: TopicScheme, *, client_id: str = "") -> None:
        self.topics = topics
        self._url = url
        self._mqtt = AsyncMqttClient(url, client_id=client_id, on_message=self._on_message,
                                     name="broker-admin")
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # Every BrokerAdmin (each API request that provisions, each bridge, each CLI command)
        # subscribes to the one response topic and so receives every other's answers. Ids
        # unique to this instance keep them apart: with a shared "c1, c2, ..." an admin took
        # another's answer, reported a failure the broker had not had (or the reverse), and
        # left logins in the broker without a database row.
        self._prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> BrokerAdmin:
        await self._mqtt.__aenter__()
        try:
            await self._mqtt.subscribe([RESPONSE_TOPIC])
        except BaseException:
            await self._mqtt.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._mqtt.close()

    def _on_message(self, msg: Any) -> None:
        try:
            # The plugin echoes names as stored; bytes that are not UTF-8 must not make the
            # whole answer vanish (the caller would wait for its time-out, then fail).
            body = json.loads(msg.payload.decode("utf-8", errors="replace"))
            responses = body["responses"]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("unreadable answer from the dynamic-security plugin: %r", bytes(msg.payload[:200]))
            return
        for resp in responses:
            if not isinstance(resp, dict):
                continue
            fut = self._waiters.pop(str(resp.get("correlationData", "")), None)
            if fut is not None and not fut.done():
                fut.set_result(resp)

    async def execute(self, commands: list[dict[str, Any]], *, timeout: float = 10,
                      ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Send commands in one message; return responses; raise on the first error whose
        text contains none of ``ignore``."""
        if not commands:
            return []
        loop = asyncio.get_running_loop()
        futures = []
        for cmd in commands:
            cid = f"{self._prefix}-{next(self._ids)}"
            cmd = {**cmd, "correlationData": cid}
            fut = loop.create_future()
            self._waiters[cid] = fut
            futures.append((cmd, fut))
        await self._mqtt.publish(CONTROL_TOPIC, json.dumps({"commands": [c for c, _ in futures]}))
        try:
            responses = await asyncio.wait_for(asyncio.gather(*(f for _, f in futures)), timeout)
        except TimeoutError:
            raise BrokerError("the broker's dynamic-security plugin did not answer") from None
        finally:
            for cmd, _ in futures:
                self._waiters.pop(cmd["correlationData"], None)
        for resp in responses:
            err = resp.get("error")
            if err and not any(s in err for s in ignore):
                raise DynsecError(resp.get("command", "?"), err)
        return list(responses)

    # -- devices ---------------------------------------------------------------

    def _device_create_cmds(self, org: str, device: str, password: str, enabled: bool) -> list[dict[str, Any]]:
        user = device_username(org, device)
        cmds: list[dict[str, Any]] = [
            {"command": "createRole", "rolename": device_rolename(org, device),
             "acls": device_acls(self.topics, org, device)},
            {"command": "createClient", "username": user, "password": password, "clientid": user,
             "textname": f"device {org}/{device}", "roles": [{"rolename": device_rolename(org, device)}]},
        ]
        if not enabled:
            cmds.append({"command": "disableClient", "username": user})
        return cmds

    async def create_device(self, org: str, device: str, password: str, *, enabled: bool = True) -> None:
        await self.execute(self._device_create_cmds(org, device, password, enabled))

    async def set_device_password(self, org: str, device: str, password: str) -> None:
        await self.execute([{"command": "setClientPassword", "username": device_username(org, device),
                             "password": password}])

    async def set_device_enabled(self, org: str, device: str, enabled: bool) -> None:
        """Disabling also disconnects the device at once (the plugin kicks the client)."""
        cmd = "enableClient" if enabled else "disableClient"
        await self.execute([{"command": cmd, "username": device_username(org, device)}])

    async def delete_device(self, org: str, device: str) -> None:
        await self.execute([
            {"command": "deleteClient", "username": device_username(org, device)},
            {"command": "deleteRole", "rolename": device_rolename(org, device)},
        ], ignore=("not found",))

    # -- technicians ---------------------------------------------------------------

    async def create_technician(self, org: str, username: str, password: str) -> None:
        await self.execute([
            {"command": "createRole", "rolename": tech_rolename(org), "acls": tech_acls(self.topics, org)},
        ], ignore=("already exists",))
        await self.execute([
            {"command": "createClient", "username": username, "password": password, "clientid": username,
             "textname": f"technician of {org}", "roles": [{"rolename": tech_rolename(org)}]},
        ])

    # -- the read-only watch login -------------------------------------------------------

    async def ensure_watch(self, password: str, username: str = WATCH_USER) -> str:
        """Create or repair the read-only watch login (subscribe to ``{root}/#``, publish
        nothing, client id pinned to ``username``) with ``password``; return the username.
        Idempotent: run at every start of the local stack."""
        acls = watch_acls(self.topics)
        roles = await self.list_roles()
        if WATCH_ROLE not in roles:
            await self.execute([{"command": "createRole", "rolename": WATCH_ROLE, "acls": acls,
                                 "textname": "read-only watch of all platform topics"}])
        elif _acl_set(roles[WATCH_ROLE]) != _acl_set(acls):
            await self.execute([{"command": "modifyRole", "rolename": WATCH_ROLE, "acls": acls}])
        if username not in await self.list_clients():
            await self.execute([{"command": "createClient", "username": username, "password": password,
                                 "clientid": username, "textname": "read-only watch login",
                                 "roles": [{"rolename": WATCH_ROLE}]}])
        else:
            # Exactly this role, no group, its own id: whatever else it had is taken away.
            await self.execute([
                {"command": "modifyClient", "username": username, "clientid": username,
                 "roles": [{"rolename": WATCH_ROLE}], "groups": []},
                {"command": "setClientPassword", "username": username, "password": password},
            ])
        return username

    async def delete_org_logins(self, org: str, devices: list[str], technicians: list[str]) -> None:
        """Delete every broker login of an organization: its devices' clients and roles, its
        technicians' clients and its technician role. The plugin disconnects connected ones.

        Every client, then every role. Besides the logins the database knows, any broker
        client holding one of the organization's roles goes too (one left by a failure
        between the broker and the database): Mosquitto 2.0 frees a role that a client
        still holds and then reads freed memory (eclipse/mosquitto#2660) - the review's
        organization-delete race crashed the broker that way.
        """
        tech_role, device_role = tech_rolename(org), f"{DEVICE_ROLE_PREFIX}{org}."
        clients = {device_username(org, d) for d in devices} | set(technicians)
        for c in (await self.list_clients()).values():
            if any(r == tech_role or r.startswith(device_role) for r in c.roles):
                clients.add(c.username)
        roles = {device_rolename(org, d) for d in devices} | {tech_role}
        roles |= {r for r in await self.list_roles() if r.startswith(device_role)}
        cmds: list[dict[str, Any]] = [{"command": "deleteClient", "username": u} for u in sorted(clients)]
        cmds += [{"command": "deleteRole", "rolename": r} for r in sorted(roles)]
        for i in range(0, len(cmds), 200):  # one bounded message each (see reconcile)
            await self.execute(cmds[i : i + 200], ignore=("not found",))

    async def forget(self, client_ids: list[str]) -> None:
        """Discard the sessions of deleted logins (subscriptions and queued messages, which a
        later login of the same client id would otherwise resume, and which keep collecting
        messages of a later organization of the same slug).

        The service account's client id is not pinned (module docstring), so it can
        connect under each id with a clean session, which is how MQTT discards one.
        Run after the logins were deleted, so nobody else is connected under those ids;
        their retained messages (a kicked device's Last Will included, published by then)
        go with :meth:`clear_retained` afterwards.
        """
        async def discard(client_id: str) -> None:
            async with AsyncMqttClient(self._url, client_id=client_id, name="session discard"):
                pass

        for i in range(0, len(client_ids), 20):
            await asyncio.gather(*(discard(c) for c in client_ids[i : i + 20]))

    async def clear_retained(self, topic_filter: str) -> int:
        """Delete every retained message under ``topic_filter``; return how many."""
        return len(await clear_retained(self._url, [topic_filter]))

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 on the admin's connection and wait for the broker's PUBACK (the
        platform's own messages: reconcile restores retained ``config`` with it)."""
        await self._mqtt.publish(topic, payload, qos=1, retain=retain)

    async def delete_client(self, username: str) -> None:
        """Delete a client; connected sessions of it are disconnected by the plugin."""
        await self.execute([{"command": "deleteClient", "username": username}], ignore=("not found",))

    # -- inspection --------------------------------------------------------------

    async def list_clients(self) -> dict[str, BrokerClient]:
        out: dict[str, BrokerClient] = {}
        (resp,) = await self.execute([{"command": "listClients", "verbose": True, "count": -1}])
        for c in resp.get("data", {}).get("clients", []):
            out[c["username"]] = BrokerClient(
                username=c["username"],
                disabled=bool(c.get("disabled", False)),
                roles=tuple(r["rolename"] for r in c.get("roles", [])),
                clientid=c.get("clientid"),
                groups=tuple(g["groupname"] for g in c.get("groups", [])),
            )
        return out

    async def list_roles(self) -> dict[str, list[dict[str, Any]]]:
        (resp,) = await self.execute([{"command": "listRoles", "verbose": True, "count": -1}])
        return {r["rolename"]: r.get("acls", []) for r in resp.get("data", {}).get("roles", [])}


async def clear_retained(url: MqttUrl, filters: list[str], *, client_id: str = "",
                         before_clear: Callable[[str], None] | None = None,
                         quiet: float = 0.5, limit: float = 30) -> list[str]:
    """Delete every retained message under ``filters``; return the topics cleared.

    The broker replays retained messages to a new subscription (flag set) right after the
    SUBACK; a pause of ``quiet`` s without another ends the replay (live messages may keep
    coming, so it cannot wait for silence), ``limit`` s end it regardless. Each is answered
    with an empty retained message, which deletes it (MQTT 3.1.1 3.3.1.3); ``before_clear``
    is told each topic just before. A connection of its own, so the replay is never mixed
    with anything else. QoS 0: a replay the broker drops is found by the next call.
    """
    found: list[str] = []
    more = asyncio.Event()

    def on_message(msg: Any) -> None:
        if msg.retain and msg.payload:
            found.append(msg.topic)
            more.set()

    async with AsyncMqttClient(url, client_id=client_id, on_message=on_message, name="retained clear") as mqtt:
        await mqtt.subscribe(filters, qos=0)
        deadline = asyncio.get_running_loop().time() + limit
        while asyncio.get_running_loop().time() < deadline:
            more.clear()
            try:
                await asyncio.wait_for(more.wait(), quiet)
            except TimeoutError:
                break
        await mqtt.unsubscribe(filters)
        topics = list(dict.fromkeys(found))
        for topic in topics:
            if before_clear is not None:
                before_clear(topic)
            await mqtt.publish(topic, b"", qos=1, retain=True)
    return topics


def _acl_set(acls: list[dict[str, Any]]) -> set[tuple[Any, Any, bool]]:
    return {(a.get("acltype"), a.get("topic"), bool(a.get("allow"))) for a in acls}
