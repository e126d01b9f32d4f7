"""The role matrix, walked over every organization route of the OpenAPI document, and
devices managed through REST against the real broker."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from api.access import MATRIX, ROLES
from lms_core.provisioning import DeviceCredentials
from tests.harness import ApiProcess, Device, Stack, wait_until

PASSWORD = "correct horse battery"


class User:
    def __init__(self, api: ApiProcess, email: str) -> None:
        self.email = email
        self.client = httpx.Client(base_url=api.url, timeout=15)
        try:
            r = self.client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
            assert r.status_code in (201, 409), r.text
            r = self.client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
            assert r.status_code == 200, r.text
        except BaseException:
            self.client.close()  # a failed set-up must not leak its socket into a later test
            raise
        self.client.cookies.clear()
        self.client.headers["Authorization"] = f"Bearer {r.json()['access_token']}"

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.client.request(method, path, json=body)


def _org_routes(api: ApiProcess) -> list[tuple[str, str, str]]:
    """(method, path template, permission) of every /api/v1/orgs/{org}... operation."""
    spec = httpx.get(api.url + "/schema/openapi.json", timeout=10).json()
    routes = []
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/v1/orgs/{org}"):
            continue
        for method in ops:
            routes.append((method.upper(), path))
    assert len(routes) >= 10, routes
    # The permission each route declares, from the running app's own table.
    from api.app import create_app
    from lms_core.settings import Settings

    app = create_app(Settings.from_env({"LMS_DATABASE_URL": "postgresql://x@y/z", "LMS_MQTT_URL": "mqtt://a:b@c"},
                                       require_secret=False))
    perms: dict[tuple[str, str], str] = {}
    for route in app.routes:
        template = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for handler in getattr(route, "route_handlers", []):
            for m in handler.http_methods:
                if "perm" in handler.opt:
                    perms[(m, template)] = handler.opt["perm"]
    return [(m, p, perms[(m, p)]) for m, p in routes]


def test_every_org_route_answers_per_the_role_matrix(api: ApiProcess, stack: Stack, unique: str) -> None:
    owner = User(api, f"{unique}-owner@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    users: dict[str, User] = {"owner": owner}
    for role in ROLES[1:]:
        users[role] = User(api, f"{unique}-{role}@example.com")
        r = owner.call("PUT", f"/api/v1/orgs/{unique}/members/{users[role].email}", {"role": role})
        assert r.status_code == 200, r.text
    outsider = User(api, f"{unique}-outsider@example.com")
    assert outsider.call("POST", "/api/v1/orgs", {"slug": f"{unique}-x"}).status_code == 201
    superuser = User(api, f"{unique}-super@example.com")
    stack.query("UPDATE users SET is_superuser = true WHERE email = $1", superuser.email)

    routes = _org_routes(api)
    # Destructive routes of the whole organization run last, by those allowed to.
    routes.sort(key=lambda r: r[2] == "org.manage")
    checked = 0
    for method, template, perm in routes:
        path = (template.replace("{org}", unique).replace("{device}", "no-such-device")
                .replace("{email}", "nobody@example.com"))
        path = re.sub(r"\{\w+\}", "999999", path)  # numeric ids of things that do not exist
        body = {} if method in ("POST", "PUT", "PATCH") else None
        r = outsider.call(method, path, body)
        assert r.status_code == 404 and "organization" in r.json()["error"]["message"], (method, template, r.text)
        r = httpx.request(method, api.url + path, json=body, timeout=10)
        assert r.status_code == 401, (method, template, "anonymous")
        for role, user in users.items():
            if perm == "org.manage" and role in MATRIX[perm]:
                continue  # would delete the organization under the other checks; done below
            r = user.call(method, path, body)
            if role in MATRIX[perm]:
                assert r.status_code not in (401, 403), (method, template, role, r.text)
                assert not (r.status_code == 404 and "organization" in r.text), (method, template, role)
            else:
                assert r.status_code == 403, (method, template, role, r.status_code, r.text)
            checked += 1
        if perm != "org.manage":
            r = superuser.call(method, path, body)
            assert r.status_code not in (401, 403, 500), (method, template, "superuser", r.text)
    assert checked > 50
    assert owner.call("DELETE", f"/api/v1/orgs/{unique}").status_code == 204
    assert owner.call("GET", f"/api/v1/orgs/{unique}").status_code == 404
    for u in (*users.values(), outsider, superuser):
        u.client.close()


def test_device_lifecycle_through_rest_and_the_real_broker(api: ApiProcess, stack: Stack, unique: str) -> None:
    owner = User(api, f"{unique}@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique, "name": "Acme"}).status_code == 201
    r = owner.call("POST", f"/api/v1/orgs/{unique}/devices",
                   {"slug": "pump-1", "name": "Pump", "properties": {"site": "north"}, "tags": ["pumps"]})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["device"]["tags"] == ["pumps"] and body["device"]["properties"] == {"site": "north"}
    creds = DeviceCredentials(**body["credentials"])
    assert creds.topic_prefix == f"lms/{unique}/pump-1"
    assert owner.call("GET", f"/api/v1/orgs/{unique}/devices/pump-1").json().get("credentials") is None

    dev = Device(stack.mq.port, creds)
    assert dev.connect().value == 0
    dev.publish_wait("telemetry", json.dumps({"ts": int(time.time() * 1000) - 1000, "values": {"flow": 3.5}}))
    dev.publish_wait("status", "online")
    wait_until(lambda: owner.call("GET", f"/api/v1/orgs/{unique}/devices/pump-1").json()["status"] == "online",
               10, "the device to show online")
    assert owner.call("GET", f"/api/v1/orgs/{unique}/devices?tag=pumps").json()[0]["slug"] == "pump-1"
    assert owner.call("GET", f"/api/v1/orgs/{unique}/devices?tag=other").json() == []

    r = owner.call("PATCH", f"/api/v1/orgs/{unique}/devices/pump-1", {"name": "Main pump", "tags": ["a", "b"]})
    assert r.status_code == 200 and r.json()["name"] == "Main pump" and r.json()["properties"] == {"site": "north"}

    # Disable: the broker kicks the device at once.
    assert owner.call("POST", f"/api/v1/orgs/{unique}/devices/pump-1/disable").json()["enabled"] is False
    wait_until(lambda: dev.disconnects, 5, "the disabled device to be disconnected")
    dev.stop()
    assert owner.call("POST", f"/api/v1/orgs/{unique}/devices/pump-1/enable").json()["enabled"] is True

    # Rotation: the old password stops working, the new one works.
    new = DeviceCredentials(**owner.call("POST", f"/api/v1/orgs/{unique}/devices/pump-1/credentials").json())
    assert Device(stack.mq.port, creds).connect().is_failure
    d2 = Device(stack.mq.port, new)
    assert d2.connect().value == 0
    d2.close()

    # Delete keeps the data unless purged; the broker forgets the device either way.
    assert owner.call("DELETE", f"/api/v1/orgs/{unique}/devices/pump-1").status_code == 204
    assert Device(stack.mq.port, new).connect().is_failure
    assert stack.scalar("SELECT count(*) FROM readings WHERE metric = 'flow' AND value = 3.5") >= 1
    assert owner.call("GET", f"/api/v1/orgs/{unique}/devices/pump-1").status_code == 404
    actions = [r["action"] for r in stack.query(
        "SELECT a.action FROM audit_log a JOIN organizations o ON o.id = a.org_id WHERE o.slug = $1 ORDER BY a.id",
        unique)]
    assert actions == ["org.created", "device.created", "device.disabled", "device.enabled",
                       "device.credentials_rotated", "device.deleted"]
    owner.client.close()


@pytest.mark.parametrize("body", [
    {"slug": "Bad Slug"},
    {"slug": "ok", "tags": ["no spaces allowed"]},
    {"slug": "ok", "properties": [1]},
    {"slug": "ok", "extra": 1},
    {"slug": "ok", "name": "x" * 201},
    {"slug": "ok", "properties": {"big": "x" * 20000}},
])
def test_bad_device_bodies_are_422(api: ApiProcess, unique: str, body: dict[str, Any]) -> None:
    owner = User(api, f"{unique}@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    r = owner.call("POST", f"/api/v1/orgs/{unique}/devices", body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid"
    owner.client.close()


def test_members_keep_an_owner_and_only_owners_make_owners(api: ApiProcess, unique: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    admin = User(api, f"{unique}-a@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "admin"}).status_code == 200
    assert admin.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "owner"}).status_code == 403
    assert admin.call("DELETE", f"/api/v1/orgs/{unique}/members/{owner.email}").status_code == 403
    r = owner.call("PUT", f"/api/v1/orgs/{unique}/members/{owner.email}", {"role": "viewer"})
    assert r.status_code == 403 and "at least one owner" in r.json()["error"]["message"]
    assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/nobody@example.com", {"role": "viewer"}
                      ).status_code == 404
    assert {m["role"] for m in owner.call("GET", f"/api/v1/orgs/{unique}/members").json()} == {"owner", "admin"}
    owner.client.close()
    admin.client.close()
