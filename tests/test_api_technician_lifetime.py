"""Technician broker logins do not outlive their creator's right to make them, against a real
``lms api`` and Mosquitto: API keys may not make them at all, and a member who is removed or
demoted to a role without ``mqtt_credentials.manage`` loses the logins they made (revoked,
disconnected, audited, in the membership change's transaction)."""

from __future__ import annotations

import httpx
import pytest

from tests.harness import ApiProcess, Stack, stop_client, wait_until
from tests.test_api_access import User
from tests.test_api_technicians import _client


def test_an_api_key_cannot_make_or_revoke_technician_logins(api: ApiProcess, stack: Stack, unique: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    try:
        assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
        tech = owner.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).json()
        for role in ("owner", "admin", "technician"):
            r = owner.call("POST", f"/api/v1/orgs/{unique}/api-keys", {"name": f"{role} key", "role": role})
            assert r.status_code == 201, r.text
            key = r.json()["key"]
            for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
                with httpx.Client(base_url=api.url, timeout=15, headers=headers) as script:
                    r = script.post(f"/api/v1/orgs/{unique}/mqtt-credentials", json={"expires_in_hours": 2160})
                    assert r.status_code == 403, r.text
                    assert "technician broker logins" in r.json()["error"]["message"]
                    r = script.delete(f"/api/v1/orgs/{unique}/mqtt-credentials/{tech['id']}")
                    assert r.status_code == 403, r.text
        assert stack.scalar("SELECT count(*) FROM mqtt_credentials o JOIN organizations g ON g.id = o.org_id "
                            "WHERE g.slug = $1", unique) == 1
        assert stack.scalar("SELECT revoked_at FROM mqtt_credentials WHERE id = $1", tech["id"]) is None
    finally:
        owner.client.close()


@pytest.mark.parametrize("change", ["demote to viewer", "demote to operator", "remove"])
def test_a_members_logins_end_with_their_right_to_make_them(api: ApiProcess, stack: Stack, unique: str,
                                                            change: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    admin = User(api, f"{unique}-a@example.com")
    other = User(api, f"{unique}-t@example.com")
    clients = []
    try:
        assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
        for u, role in ((admin, "admin"), (other, "technician")):
            assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/{u.email}", {"role": role}).status_code == 200
        mine = [admin.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {"label": f"a{i}"}).json()
                for i in range(2)]
        theirs = other.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {"label": "t"}).json()
        owners = owner.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {"label": "o"}).json()
        c, seen = _client(stack.mq.port, mine[0]["username"], mine[0]["password"])
        clients.append(c)
        assert seen["connack"][0].value == 0  # type: ignore[attr-defined]

        if change == "remove":
            r = owner.call("DELETE", f"/api/v1/orgs/{unique}/members/{admin.email}")
            assert r.status_code == 204, r.text
        else:
            role = change.rsplit(" ", 1)[1]
            r = owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": role})
            assert r.status_code == 200, r.text

        # The connected session is dropped, and neither login gets in again.
        wait_until(lambda: seen["disconnect"], 5, "the revoked login to be disconnected")
        for cred in mine:
            c2, seen2 = _client(stack.mq.port, cred["username"], cred["password"])
            clients.append(c2)
            assert seen2["connack"][0].is_failure, (cred, seen2)  # type: ignore[attr-defined]
        rows = stack.query("SELECT id, revoked_at FROM mqtt_credentials WHERE id = ANY($1::bigint[])",
                           [m["id"] for m in mine])
        assert len(rows) == 2 and all(r["revoked_at"] is not None for r in rows)
        audited = stack.query("""SELECT a.target, a.detail->>'reason' AS reason, u.email FROM audit_log a
                                 JOIN users u ON u.id = a.actor_user_id
                                 WHERE a.action = 'mqtt_credential.revoked' AND a.target = ANY($1::text[])""",
                              [str(m["id"]) for m in mine])
        assert sorted(a["target"] for a in audited) == sorted(str(m["id"]) for m in mine)
        assert {a["email"] for a in audited} == {owner.email}
        assert {a["reason"] for a in audited} == {"member removed" if change == "remove"
                                                  else f"member {change.replace('demote', 'demoted')}"}

        # Logins others made stay.
        for cred in (theirs, owners):
            c3, seen3 = _client(stack.mq.port, cred["username"], cred["password"])
            clients.append(c3)
            assert seen3["connack"][0].value == 0, cred  # type: ignore[attr-defined]
        assert stack.scalar("SELECT count(*) FROM mqtt_credentials WHERE id = ANY($1::bigint[]) "
                            "AND revoked_at IS NULL", [theirs["id"], owners["id"]]) == 2
    finally:
        for cl in clients:
            stop_client(cl)
        for u in (owner, admin, other):
            u.client.close()


def test_a_demotion_to_technician_keeps_the_logins(api: ApiProcess, stack: Stack, unique: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    admin = User(api, f"{unique}-a@example.com")
    try:
        assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
        assert owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "admin"}).status_code == 200
        cred = admin.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).json()
        r = owner.call("PUT", f"/api/v1/orgs/{unique}/members/{admin.email}", {"role": "technician"})
        assert r.status_code == 200, r.text
        c, seen = _client(stack.mq.port, cred["username"], cred["password"])
        stop_client(c)
        assert seen["connack"][0].value == 0  # type: ignore[attr-defined]
        assert stack.scalar("SELECT revoked_at FROM mqtt_credentials WHERE id = $1", cred["id"]) is None
    finally:
        owner.client.close()
        admin.client.close()
