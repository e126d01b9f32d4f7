"""The audit log: a change and its record commit together, or neither does."""

from __future__ import annotations

from tests.harness import ApiProcess, Stack
from tests.test_api_access import User


def test_a_change_whose_audit_record_fails_does_not_happen(api: ApiProcess, stack: Stack, unique: str) -> None:
    """Each change is recorded in its own transaction. Before, devices, technician logins and
    organization deletes wrote the record after the change had committed: a failure (or a
    crash) in between kept the change and lost the security event."""
    admin = User(api, f"{unique}@example.com")
    assert admin.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    assert admin.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}).status_code == 201
    tech = admin.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).json()
    user_id = stack.scalar("SELECT id FROM users WHERE email = $1", admin.email)
    nonce_sql = ("SELECT credential_nonce FROM devices WHERE slug = 'd1' AND org_id = "
                 "(SELECT id FROM organizations WHERE slug = $1)")
    nonce = stack.scalar(nonce_sql, unique)
    # A fault injected at the edge: the database refuses this user's audit rows from now on.
    fn = f"refuse_audit_{unique}"
    stack.query(f"""CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN
                        IF NEW.actor_user_id = {int(user_id)} THEN RAISE EXCEPTION 'audit log unavailable'; END IF;
                        RETURN NEW;
                    END $$""")
    stack.query(f"CREATE TRIGGER {fn} BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION {fn}()")
    try:
        attempts = [
            ("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d2"}),
            ("POST", f"/api/v1/orgs/{unique}/devices/d1/disable", None),
            ("POST", f"/api/v1/orgs/{unique}/devices/d1/credentials", None),
            ("DELETE", f"/api/v1/orgs/{unique}/devices/d1", None),
            ("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}),
            ("DELETE", f"/api/v1/orgs/{unique}/mqtt-credentials/{tech['id']}", None),
            ("DELETE", f"/api/v1/orgs/{unique}", None),
        ]
        for method, path, body in attempts:
            r = admin.call(method, path, body)
            assert r.status_code >= 500, (method, path, r.status_code, r.text)
    finally:
        stack.query(f"DROP TRIGGER {fn} ON audit_log")
        stack.query(f"DROP FUNCTION {fn}()")
    assert admin.call("GET", f"/api/v1/orgs/{unique}").status_code == 200
    assert admin.call("GET", f"/api/v1/orgs/{unique}/devices/d2").status_code == 404
    d1 = admin.call("GET", f"/api/v1/orgs/{unique}/devices/d1")
    assert d1.status_code == 200 and d1.json()["enabled"] is True
    assert stack.scalar(nonce_sql, unique) == nonce  # not rotated
    creds = admin.call("GET", f"/api/v1/orgs/{unique}/mqtt-credentials").json()
    assert [(c["id"], c["revoked_at"]) for c in creds] == [(tech["id"], None)]
    admin.client.close()
