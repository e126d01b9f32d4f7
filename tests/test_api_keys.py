"""API keys: one organization, the key's role, shown once, stored hashed, revocable."""

from __future__ import annotations

import httpx

from tests.harness import ApiProcess, Stack
from tests.test_api_access import User


def test_api_key_is_scoped_to_its_org_and_role_and_revocable(api: ApiProcess, stack: Stack, unique: str) -> None:
    owner = User(api, f"{unique}@example.com")
    for slug in (unique, f"{unique}-b"):
        assert owner.call("POST", "/api/v1/orgs", {"slug": slug}).status_code == 201
    r = owner.call("POST", f"/api/v1/orgs/{unique}/api-keys", {"name": "grafana", "role": "viewer"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    assert key.startswith("lms_")
    stored = stack.query("SELECT prefix, key_hash FROM api_keys WHERE name = 'grafana' AND org_id = "
                         "(SELECT id FROM organizations WHERE slug = $1)", unique)[0]
    assert key.split("_")[2] not in stored["key_hash"] and stored["prefix"] == key.split("_")[1]

    with httpx.Client(base_url=api.url, timeout=10) as script:
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            assert script.get(f"/api/v1/orgs/{unique}/devices", headers=headers).status_code == 200
            # viewer: reads, never writes
            assert script.post(f"/api/v1/orgs/{unique}/devices", headers=headers,
                               json={"slug": "x"}).status_code == 403
            # the other organization of the same user is out of reach
            assert script.get(f"/api/v1/orgs/{unique}-b/devices", headers=headers).status_code == 404
            # accounts and new organizations are for users, not keys
            assert script.post("/api/v1/orgs", headers=headers, json={"slug": f"{unique}-c"}).status_code == 403
            assert script.post(f"/api/v1/orgs/{unique}/api-keys", headers=headers,
                               json={"name": "k"}).status_code == 403
        listed = owner.call("GET", f"/api/v1/orgs/{unique}/api-keys").json()
        assert listed[0]["last_used_at"] is not None and "key" not in listed[0]
        assert owner.call("DELETE", f"/api/v1/orgs/{unique}/api-keys/{listed[0]['id']}").status_code == 204
        assert script.get(f"/api/v1/orgs/{unique}/devices", headers={"X-API-Key": key}).status_code == 401
        wrong = key[:-3] + ("abc" if not key.endswith("abc") else "xyz")
        assert script.get(f"/api/v1/orgs/{unique}/devices", headers={"X-API-Key": wrong}).status_code == 401
        assert script.get(f"/api/v1/orgs/{unique}/devices", headers={"X-API-Key": "lms_nope"}).status_code == 401
    actions = [r["action"] for r in stack.query(
        "SELECT action FROM audit_log a JOIN organizations o ON o.id = a.org_id WHERE o.slug = $1 ORDER BY a.id",
        unique)]
    assert actions == ["org.created", "api_key.created", "api_key.revoked"]
    owner.client.close()


def test_admin_cannot_mint_an_owner_key(api: ApiProcess, unique: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    admin = User(api, f"{unique}-a@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "admin"})
    assert admin.call("POST", f"/api/v1/orgs/{unique}/api-keys", {"name": "k", "role": "owner"}).status_code == 403
    assert admin.call("POST", f"/api/v1/orgs/{unique}/api-keys", {"name": "k", "role": "operator"}
                      ).status_code == 201
    assert admin.call("POST", f"/api/v1/orgs/{unique}/api-keys", {"name": ""}).status_code == 422
    owner.client.close()
    admin.client.close()


def _key(user: User, org: str, role: str) -> dict[str, str]:
    r = user.call("POST", f"/api/v1/orgs/{org}/api-keys", {"name": f"{role} key", "role": role})
    assert r.status_code == 201, r.text
    return {"X-API-Key": r.json()["key"]}


def test_a_key_is_capped_by_its_creators_current_role(api: ApiProcess, unique: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    admin = User(api, f"{unique}-a@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "admin"}).status_code == 200
    key = _key(admin, unique, "admin")
    devices = f"/api/v1/orgs/{unique}/devices"
    with httpx.Client(base_url=api.url, timeout=15, headers=key) as script:
        assert script.post(devices, json={"slug": "d1"}).status_code == 201
        # The admin is demoted to viewer: the key reads, and no longer writes.
        assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "viewer"}
                          ).status_code == 200
        r = script.post(devices, json={"slug": "d2"})
        assert r.status_code == 403 and "acts as viewer" in r.json()["error"]["message"], r.text
        assert script.get(devices).status_code == 200
        # Back to admin: the key's own role holds again (it never exceeded it).
        assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "admin"}
                          ).status_code == 200
        assert script.post(devices, json={"slug": "d3"}).status_code == 201
        # Removed from the organization: the key stops working.
        assert owner.call("DELETE", f"/api/v1/orgs/{unique}/members/{admin.email}").status_code == 204
        assert script.get(devices).status_code == 401
    owner.client.close()
    admin.client.close()


def test_a_superusers_key_lasts_only_while_they_are_superuser(api: ApiProcess, stack: Stack, unique: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    root = User(api, f"{unique}-root@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    stack.query("UPDATE users SET is_superuser = true WHERE email = $1", root.email)
    key = _key(root, unique, "operator")  # not a member: the key's role is its only bound
    with httpx.Client(base_url=api.url, timeout=15, headers=key) as script:
        assert script.get(f"/api/v1/orgs/{unique}/devices").status_code == 200
        assert script.post(f"/api/v1/orgs/{unique}/devices", json={"slug": "d"}).status_code == 403  # operator
        stack.query("UPDATE users SET is_superuser = false WHERE email = $1", root.email)
        assert script.get(f"/api/v1/orgs/{unique}/devices").status_code == 401
    owner.client.close()
    root.client.close()


def test_keys_never_manage_members(api: ApiProcess, unique: str) -> None:
    """A leaked owner key must not make a real account admin, which would outlive the key."""
    owner = User(api, f"{unique}-o@example.com")
    friend = User(api, f"{unique}-f@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/{friend.email}", {"role": "viewer"}).status_code == 200
    key = _key(owner, unique, "owner")
    members = f"/api/v1/orgs/{unique}/members"
    with httpx.Client(base_url=api.url, timeout=15, headers=key) as script:
        for method, path, body in (("PUT", f"{members}/{friend.email}", {"role": "admin"}),
                                   ("PUT", f"{members}/{unique}-new@example.com", {"role": "viewer"}),
                                   ("DELETE", f"{members}/{friend.email}", None),
                                   ("GET", f"/api/v1/orgs/{unique}/api-keys", None)):
            r = script.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert "API key" in r.json()["error"]["message"]
        assert {m["email"]: m["role"] for m in script.get(members).json()}[friend.email] == "viewer"
    owner.client.close()
    friend.client.close()
