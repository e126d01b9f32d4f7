"""Device provisioning: database rows and broker credentials, kept in step.

Device passwords are never stored. Each is ``HMAC-SHA256(secret, org/device/nonce)``
with a random per-device nonce kept in the database, so that:

* a stolen database alone reveals no password;
* the broker's credentials can be rebuilt from the database (:meth:`Provisioner.reconcile`) after
  the broker's state is lost, without asking every device to be re-provisioned;
* rotating credentials is a new nonce.

Changing ``LMS_SECRET_KEY`` therefore changes every device's password the next time the
broker is rebuilt; :meth:`Provisioner.reconcile` only sets passwords for clients missing from the
broker, so it does not lock devices out by itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from lms_core import rollups
from lms_core.broker import (
    DEVICE_ROLE_PREFIX,
    PLATFORM_ROLE,
    TECH_ROLE_PREFIX,
    BrokerAdmin,
    device_acls,
    device_rolename,
    device_username,
    is_device_client,
    platform_acls,
    tech_acls,
    tech_rolename,
)
from lms_core.commands import config_payload
from lms_core.errors import AlreadyExists, NotFound
from lms_core.topics import TopicScheme, check_slug

if TYPE_CHECKING:
    from lms_core.settings import Settings

log = logging.getLogger("lms.provisioning")

#: Reconcile holds this advisory lock exclusively from reading the database to its last
#: broker command; provisioning takes it shared inside its transaction. Without it a
#: reconcile could delete a client created a moment ago (its row not yet committed) or
#: re-enable a device being disabled.
RECONCILE_LOCK = 0x4C4D5302

#: Reconcile restores retained configuration this many devices at a time, each group under
#: its rows' share locks (:meth:`Provisioner._restore_config`): an API change of one of them
#: waits at most for one group's publishes and their PUBACKs.
RESTORE_GROUP = 200

#: Writes the audit record of a change (the API's): called with the change's connection and
#: target inside the change's transaction, before the broker is touched, so that the change
#: and its record commit together or not at all (a crash in between cannot lose the record).
Record = Callable[[asyncpg.Connection, str], Awaitable[None]]


class DeviceCredentials(msgspec.Struct, frozen=True):
    """What a device needs to connect; shown once at creation or rotation."""

    username: str
    password: str
    client_id: str
    topic_prefix: str
    mqtt_url: str


def derive_password(secret: str, org: str, device: str, nonce: str) -> str:
    mac = hmac.new(secret.encode(), f"{org}/{device}/{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode()[:32]


@dataclass(frozen=True, slots=True)
class Provisioner:
    """Creates, rotates, disables devices in the database and the broker together."""

    pool: asyncpg.Pool
    admin: BrokerAdmin
    topics: TopicScheme
    secret: str
    mqtt_url: str

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Provisioner]:
        """The one way to build a provisioner: with its own broker admin connection, opened
        here and closed on exit (device changes are rare; a connection per change is cheap)."""
        topics = TopicScheme(settings.topic_root)
        async with BrokerAdmin(settings.mqtt, topics) as admin:
            yield cls(pool, admin, topics, settings.secret_key, settings.device_mqtt_url)

    def _credentials(self, org: str, device: str, nonce: str) -> DeviceCredentials:
        user = device_username(org, device)
        return DeviceCredentials(
            username=user,
            password=derive_password(self.secret, org, device, nonce),
            client_id=user,
            topic_prefix=self.topics.device_prefix(org, device),
            mqtt_url=self.mqtt_url,
        )

    async def create_device(self, org: str, device: str, name: str = "", *, properties: str = "{}",
                            tags: list[str] | None = None, create_org: bool = False,
                            record: Record | None = None) -> DeviceCredentials:
        """Create the device and its broker credentials in an existing organization.

        ``create_org=True`` (tests and benchmarks only) also creates a missing organization;
        the CLI and the API never pass it: adopting an organization made by someone else
        put devices in a stranger's hands.

        The broker call runs inside the database transaction: if the broker refuses, the
        rows are rolled back; if the commit fails afterwards, the next reconcile removes
        the orphaned broker client.
        """
        check_slug(org, "organization")
        check_slug(device, "device")
        nonce = secrets.token_urlsafe(16)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            if create_org:
                org_id = await conn.fetchval(
                    """INSERT INTO organizations (slug, name) VALUES ($1, $1)
                       ON CONFLICT (slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING id""",
                    org,
                )
            else:
                org_id = await conn.fetchval("SELECT id FROM organizations WHERE slug = $1", org)
                if org_id is None:
                    raise NotFound(f"organization {org} does not exist")
            device_id = await conn.fetchval(
                """INSERT INTO devices (org_id, slug, name, credential_nonce, properties, tags)
                   VALUES ($1, $2, $3, $4, $5::jsonb, $6)
                   ON CONFLICT (org_id, slug) DO NOTHING RETURNING id""",
                org_id, device, name or device, nonce, properties, tags or [],
            )
            if device_id is None:
                raise AlreadyExists(f"device {org}/{device} already exists")
            creds = self._credentials(org, device, nonce)
            if record is not None:
                await record(conn, device)
            # A leftover broker client of an earlier device of the same name is replaced.
            await self.admin.delete_device(org, device)
            await self.admin.create_device(org, device, creds.password)
        log.info("device created", extra={"org": org, "device": device})
        return creds

    async def ensure_devices(self, org: str, devices: list[str], *, tags: list[str] | None = None,
                             in_broker: bool = True) -> list[DeviceCredentials]:
        """Devices ``devices`` of the existing organization ``org``, created where missing, and
        the credentials of all of them: for the fleet simulator and benchmarks.

        A device that exists keeps its credentials (its password is derived again from its
        nonce, not rotated). New rows go in in one transaction; then each new device's broker
        login, one small command message at a time: Mosquitto's dynamic-security plugin
        rewrites its whole file after every command, so a command costs more the more logins
        there are (measured here: 3 ms at none, 20-60 ms at 2,000), and a large message
        would block the broker for all its clients meanwhile. ``in_broker=False`` leaves the
        broker alone (``add_devices_offline`` writes them into a stopped broker's file).
        """
        check_slug(org, "organization")
        for d in devices:
            check_slug(d, "device")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            org_id = await conn.fetchval("SELECT id FROM organizations WHERE slug = $1", org)
            if org_id is None:
                raise NotFound(f"organization {org} does not exist")
            rows = await conn.fetch(
                """INSERT INTO devices (org_id, slug, name, credential_nonce, tags)
                   SELECT $1, s, s, n, $4 FROM unnest($2::text[], $3::text[]) AS t(s, n)
                   ON CONFLICT (org_id, slug) DO NOTHING RETURNING slug""",
                org_id, devices, [secrets.token_urlsafe(16) for _ in devices], tags or [])
            nonces = {r["slug"]: r["credential_nonce"] for r in await conn.fetch(
                "SELECT slug, credential_nonce FROM devices WHERE org_id = $1 AND slug = ANY($2::text[])",
                org_id, devices)}
        creds = [self._credentials(org, d, nonces[d]) for d in devices]
        if rows and in_broker:
            new = {r["slug"] for r in rows}
            for c, d in zip(creds, devices, strict=True):
                if d in new:
                    await self.admin.delete_device(org, d)  # a leftover login of an earlier device
                    await self.admin.create_device(org, d, c.password)
        if rows:
            log.info("devices created", extra={"org": org, "count": len(rows)})
        return creds

    async def rotate_credentials(self, org: str, device: str, *, record: Record | None = None) -> DeviceCredentials:
        nonce = secrets.token_urlsafe(16)
        async with self.pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
                old = await conn.fetchval(
                    """SELECT d.credential_nonce FROM devices d JOIN organizations o ON o.id = d.org_id
                       WHERE o.slug = $1 AND d.slug = $2 FOR UPDATE OF d""", org, device)
                await _update_device(conn, org, device, "credential_nonce = $3, credentials_rotated_at = now()",
                                     nonce)
                creds = self._credentials(org, device, nonce)
                if record is not None:
                    await record(conn, device)
                await self.admin.set_device_password(org, device, creds.password)
            except BaseException:
                await tr.rollback()
                raise
            try:
                await tr.commit()
            except BaseException:
                # The broker already has the new password: put the old one back, or the
                # device is locked out with a password nobody was shown.
                await self.admin.set_device_password(org, device, derive_password(self.secret, org, device, old))
                raise
        return creds

    async def set_enabled(self, org: str, device: str, enabled: bool, *, record: Record | None = None) -> None:
        """Enable or disable a device; disabling disconnects it at once."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            await _update_device(conn, org, device, "enabled = $3", enabled)
            if record is not None:
                await record(conn, device)
            await self.admin.set_device_enabled(org, device, enabled)
        log.info("device %s", "enabled" if enabled else "disabled", extra={"org": org, "device": device})

    async def create_technician(self, org_id: int, org: str, label: str, expires_at: Any,
                                created_by: int | None, *, record: Record | None = None) -> tuple[int, str, str]:
        """A subscribe-only broker login for one organization: (id, username, password)."""
        nonce = secrets.token_urlsafe(16)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            cred_id = await conn.fetchval(
                """INSERT INTO mqtt_credentials (org_id, username, label, nonce, created_by, expires_at)
                   VALUES ($1, '', $2, $3, $4, $5) RETURNING id""", org_id, label, nonce, created_by, expires_at)
            username = f"tech.{org}.{cred_id}"
            await conn.execute("UPDATE mqtt_credentials SET username = $2 WHERE id = $1", cred_id, username)
            password = derive_password(self.secret, "tech", username, nonce)
            if record is not None:
                await record(conn, username)
            await self.admin.create_technician(org, username, password)
        return int(cred_id), username, password

    async def revoke_technician(self, org_id: int, cred_id: int, *, record: Record | None = None) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            username = await conn.fetchval(
                """UPDATE mqtt_credentials SET revoked_at = now() WHERE id = $1 AND org_id = $2
                   AND revoked_at IS NULL RETURNING username""", cred_id, org_id)
            if username is None:
                return False
            if record is not None:
                await record(conn, str(cred_id))
            await self.admin.delete_client(username)
        return True

    async def revoke_technicians_created_by(self, conn: asyncpg.Connection, org_id: int, user_id: int, *,
                                            record: Record | None = None) -> list[str]:
        """Revoke every active technician login ``user_id`` created in the organization, inside
        the caller's transaction on ``conn`` (the change that takes the user's right to them
        away: a member removed or demoted), and delete them from the broker (which disconnects
        their sessions). Returns their usernames. A broker failure raises, and the caller's
        change rolls back with the revocation."""
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
        rows = await conn.fetch(
            """UPDATE mqtt_credentials SET revoked_at = now()
               WHERE org_id = $1 AND created_by = $2 AND revoked_at IS NULL RETURNING id, username""",
            org_id, user_id)
        for r in rows:
            if record is not None:
                await record(conn, str(r["id"]))
        for r in rows:
            await self.admin.delete_client(r["username"])
        return [r["username"] for r in rows]

    async def expire_technicians(self) -> int:
        """Remove the broker logins of technician credentials past their expiry."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            names = await conn.fetch(
                """UPDATE mqtt_credentials SET revoked_at = expires_at
                   WHERE revoked_at IS NULL AND expires_at <= now() RETURNING username""")
            for r in names:
                await self.admin.delete_client(r["username"])
        return len(names)

    async def delete_device(self, org: str, device: str, *, purge: bool = False,
                            record: Record | None = None) -> None:
        """Delete a device and its broker credentials; ``purge`` also deletes its data."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            dev_id = await conn.fetchval(
                """DELETE FROM devices d USING organizations o
                   WHERE o.id = d.org_id AND o.slug = $1 AND d.slug = $2 RETURNING d.id""", org, device)
            if dev_id is None:
                raise NotFound(f"device {org}/{device} does not exist")
            if purge:
                await rollups.purge_device(conn, "= $1", dev_id)
                await conn.execute("DELETE FROM events WHERE device_id = $1", dev_id)
            if record is not None:
                await record(conn, device)
            await self.admin.delete_device(org, device)
            # A device created later under the same slugs must not resume this one's session
            # (its queued commands) nor show its retained status and config.
            await self.admin.forget([device_username(org, device)])
            await self.admin.clear_retained(f"{self.topics.device_prefix(org, device)}/#")
        log.info("device deleted", extra={"org": org, "device": device, "purge": purge})

    async def delete_org(self, org_id: int, org: str, *, record: Record | None = None) -> None:
        """Delete an organization with its devices, data, quarantine and every broker login
        of it; connected logins are disconnected, and their sessions and retained messages
        discarded, before this returns.

        The broker calls run inside the database transaction (as in :meth:`create_device`):
        if the broker fails, nothing is deleted and the caller may retry. The organization's
        row is locked first, so a device or technician login created concurrently either
        committed before (and is deleted here) or fails on the missing organization.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", RECONCILE_LOCK)
            if await conn.fetchval("SELECT id FROM organizations WHERE id = $1 FOR UPDATE", org_id) is None:
                raise NotFound(f"organization {org} does not exist")
            devices = [r["slug"] for r in await conn.fetch("SELECT slug FROM devices WHERE org_id = $1", org_id)]
            techs = [r["username"] for r in await conn.fetch(
                "SELECT username FROM mqtt_credentials WHERE org_id = $1", org_id)]
            await rollups.purge_device(conn, "IN (SELECT id FROM devices WHERE org_id = $1)", org_id)
            await conn.execute("DELETE FROM events WHERE device_id IN (SELECT id FROM devices WHERE org_id = $1)",
                               org_id)
            await conn.execute("DELETE FROM quarantine WHERE org_id = $1", org_id)
            await conn.execute("DELETE FROM organizations WHERE id = $1", org_id)
            if record is not None:
                await record(conn, org)
            await self.admin.delete_org_logins(org, devices, techs)
            await self.admin.forget([device_username(org, d) for d in devices] + techs)
            # Everything retained under the organization (status and config, a command
            # result, reported config, anything retained before the broker refused it): a
            # later organization of the same slug must not be handed any of it.
            await self.admin.clear_retained(f"{self.topics.root}/{org}/#")
        log.info("organization deleted", extra={"org": org, "devices": len(devices), "technicians": len(techs)})

    async def reconcile(self) -> dict[str, int]:
        """Make the broker's device clients, roles and retained configuration match the database.

        Creates what is missing, fixes ACLs and enabled state, deletes device clients and
        roles the database does not know, publishes every device's desired configuration
        again, retained (``config_restored``), and clears deleted ones (``config_cleared``).
        Returns counts of each kind of change.
        """
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", RECONCILE_LOCK)
            try:
                return await self._reconcile(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", RECONCILE_LOCK)

    async def _reconcile(self, conn: asyncpg.Connection) -> dict[str, int]:
        rows = await conn.fetch(
            """SELECT o.slug AS org, d.slug AS device, d.enabled, d.credential_nonce
               FROM devices d JOIN organizations o ON o.id = d.org_id"""
        )
        clients = await self.admin.list_clients()
        roles = await self.admin.list_roles()
        wanted_users = set()
        wanted_roles = set()
        cmds: list[dict[str, object]] = []
        counts = {"created": 0, "acl_fixed": 0, "state_fixed": 0, "deleted": 0}
        # The platform role is the bootstrap's; an upgrade may have changed what it needs.
        want = platform_acls(self.topics)
        if PLATFORM_ROLE in roles and _acl_key(roles[PLATFORM_ROLE]) != _acl_key(want):
            cmds.append({"command": "modifyRole", "rolename": PLATFORM_ROLE, "acls": want})
            counts["acl_fixed"] += 1
        for r in rows:
            org, dev = r["org"], r["device"]
            user, role = device_username(org, dev), device_rolename(org, dev)
            wanted_users.add(user)
            wanted_roles.add(role)
            acls = device_acls(self.topics, org, dev)
            if role not in roles:
                cmds.append({"command": "createRole", "rolename": role, "acls": acls})
            elif _acl_key(roles[role]) != _acl_key(acls):
                cmds.append({"command": "modifyRole", "rolename": role, "acls": acls})
                counts["acl_fixed"] += 1
            client = clients.get(user)
            if client is None:
                password = derive_password(self.secret, org, dev, r["credential_nonce"])
                cmds.append({"command": "createClient", "username": user, "password": password,
                             "clientid": user, "textname": f"device {org}/{dev}",
                             "roles": [{"rolename": role}]})
                if not r["enabled"]:
                    cmds.append({"command": "disableClient", "username": user})
                counts["created"] += 1
                continue
            if set(client.roles) != {role} or client.groups or client.clientid != user:
                # Exactly its own role and no group: anything more is a privilege it must not have.
                cmds.append({"command": "modifyClient", "username": user, "clientid": user,
                             "roles": [{"rolename": role}], "groups": []})
                counts["acl_fixed"] += 1
            if client.disabled == r["enabled"]:
                cmds.append({"command": "enableClient" if r["enabled"] else "disableClient", "username": user})
                counts["state_fixed"] += 1
        techs = await conn.fetch(
            """SELECT m.username, m.nonce, o.slug AS org FROM mqtt_credentials m
               JOIN organizations o ON o.id = m.org_id
               WHERE m.revoked_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > now())""")
        for t in techs:
            wanted_users.add(t["username"])
            role = tech_rolename(t["org"])
            if role not in roles and role not in wanted_roles:
                cmds.append({"command": "createRole", "rolename": role, "acls": tech_acls(self.topics, t["org"])})
            wanted_roles.add(role)
            client = clients.get(t["username"])
            if client is None:
                cmds.append({"command": "createClient", "username": t["username"],
                             "password": derive_password(self.secret, "tech", t["username"], t["nonce"]),
                             "clientid": t["username"],
                             "textname": f"technician of {t['org']}", "roles": [{"rolename": role}]})
                counts["created"] += 1
            elif set(client.roles) != {role} or client.groups or client.clientid != t["username"]:
                # Its own role, no group, and its client id pinned to its name (an unpinned
                # login could take over the bridge's or a device's session).
                cmds.append({"command": "modifyClient", "username": t["username"], "clientid": t["username"],
                             "roles": [{"rolename": role}], "groups": []})
                counts["acl_fixed"] += 1
        for user, client in clients.items():
            if user.startswith(TECH_ROLE_PREFIX) and user not in wanted_users and any(
                    r.startswith(TECH_ROLE_PREFIX) for r in client.roles):
                cmds.append({"command": "deleteClient", "username": user})
                counts["deleted"] += 1
            if is_device_client(user, client.roles) and user not in wanted_users:
                cmds.append({"command": "deleteClient", "username": user})
                counts["deleted"] += 1
        for role in roles:
            # Roles of deleted devices, and technician roles of organizations that have none.
            if role.startswith((DEVICE_ROLE_PREFIX, TECH_ROLE_PREFIX)) and role not in wanted_roles:
                cmds.append({"command": "deleteRole", "rolename": role})
        # The plugin rewrites its whole file after each command message; chunks keep one
        # message from growing without bound for a large fleet.
        for i in range(0, len(cmds), 200):
            await self.admin.execute(cmds[i : i + 200])
        counts["config_restored"], counts["config_cleared"] = await self._restore_config(conn)
        return counts

    async def restore_config(self) -> tuple[int, int]:
        """The configuration part of :meth:`reconcile` alone: publish every device's desired
        configuration again, retained, and clear deleted ones; return (published, cleared).
        For a broker that lost its retained messages while the platform runs (the bridge
        calls it after a reconnection without its session). Needs no reconcile lock: each
        group is read under its rows' share locks (below), which is what orders it against
        the API's config changes and device deletions."""
        async with self.pool.acquire() as conn:
            return await self._restore_config(conn)

    async def _restore_config(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """Publish each device's desired configuration retained on its ``config`` topic, and
        clear it where the desired configuration was deleted; return (published, cleared).

        A broker that lost its persistence file lost these too, and a device reads its
        configuration from the retained message when it connects. The broker cannot be asked
        which retained messages it holds short of subscribing to all of them, so every one
        is published: a broker that kept its state gets the same message again, which
        changes nothing for a device (the same version). Deleted configuration is cleared
        again: the API cleared its retained message when it deleted it, but a broker that
        crashed before its next snapshot (``autosave_interval``) brings the deleted one back.

        The API changes a desired document and publishes it while holding its row ``FOR
        UPDATE`` (api/services/config.py). Each group here is read ``FOR SHARE`` and published
        before its transaction ends, so a change either waits for this publish or is read
        here after it committed: the retained message is never put back to an older version.
        Groups bound how long a change may wait.
        """
        ids = [r["device_id"] for r in await conn.fetch(
            "SELECT device_id FROM device_config WHERE desired IS NOT NULL OR desired_version > 0 "
            "ORDER BY device_id")]
        restored = cleared = 0
        for i in range(0, len(ids), RESTORE_GROUP):
            async with conn.transaction():
                rows = await conn.fetch(
                    """SELECT o.slug AS org, d.slug AS device, c.desired, c.desired_version
                       FROM device_config c JOIN devices d ON d.id = c.device_id
                       JOIN organizations o ON o.id = d.org_id
                       WHERE c.device_id = ANY($1::bigint[]) AND (c.desired IS NOT NULL OR c.desired_version > 0)
                       ORDER BY c.device_id FOR SHARE OF c""", ids[i : i + RESTORE_GROUP])
                messages = []
                for r in rows:
                    topic = f"{self.topics.device_prefix(r['org'], r['device'])}/config"
                    if r["desired"] is None:  # deleted: an empty retained message clears it
                        messages.append((topic, b""))
                        cleared += 1
                        continue
                    desired = json.loads(r["desired"])
                    if not isinstance(desired, dict):  # the API stores objects only; never guess
                        log.warning("desired config of %s/%s is not a JSON object; not published",
                                    r["org"], r["device"])
                        continue
                    messages.append((topic, config_payload(r["desired_version"], desired)))
                    restored += 1
                # Together: each publish waits for its PUBACK, the group shares the round trips.
                await asyncio.gather(*(self.admin.publish(topic, payload, retain=True) for topic, payload in messages))
        return restored, cleared


async def _update_device(conn: asyncpg.Connection, org: str, device: str, assignments: str, value: object) -> None:
    """``UPDATE devices SET <assignments>`` for one device by slugs; NotFound if absent.
    ``assignments`` is code, never user input; the value is ``$3``."""
    found = await conn.fetchval(
        f"""UPDATE devices d SET {assignments}, updated_at = now()
            FROM organizations o WHERE o.id = d.org_id AND o.slug = $1 AND d.slug = $2 RETURNING d.id""",
        org, device, value,
    )
    if found is None:
        raise NotFound(f"device {org}/{device} does not exist")


def _acl_key(acls: list[dict[str, object]]) -> set[tuple[object, object, object]]:
    return {(a.get("acltype"), a.get("topic"), bool(a.get("allow"))) for a in acls}
