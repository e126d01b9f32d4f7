"""Authentication through the real API process, database and all."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest

from api.auth import tokens
from tests.harness import SECRET, ApiProcess, Stack, wait_until

PASSWORD = "correct horse battery"


@pytest.fixture
def client(api: ApiProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=10) as c:
        yield c


def _register(client: httpx.Client, unique: str) -> str:
    email = f"{unique}@example.com"
    r = client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    return email


def _login(client: httpx.Client, email: str, password: str = PASSWORD, remember: bool = False) -> httpx.Response:
    return client.post("/api/v1/auth/login", json={"email": email, "password": password, "remember": remember})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_health_ready_metrics_and_request_ids(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert "lms_api_requests_total" in client.get("/metrics").text
    r = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/health", headers={"X-Request-ID": "bad id;" + "x" * 80}).headers["x-request-id"]
    assert "bad" not in generated and len(generated) == 32


def test_bearer_flow_and_logout_revokes(client: httpx.Client, unique: str) -> None:
    email = _register(client, unique)
    r = _login(client, email)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["user"]["email"] == email
    assert body["expires_at"] - time.time() == pytest.approx(3600, abs=30)
    token = body["access_token"]
    assert client.get("/api/v1/auth/me", headers=_bearer(token)).json()["email"] == email
    assert client.post("/api/v1/auth/logout", headers=_bearer(token)).status_code == 204
    r = client.get("/api/v1/auth/me", headers=_bearer(token))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized" and r.json()["request_id"]


def test_cookie_flow_flags_remember_me_and_csrf(api: ApiProcess, unique: str) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as browser:
        email = _register(browser, unique)
        r = _login(browser, email)
        cookies = r.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith("lms_session="))
        csrf = next(c for c in cookies if c.startswith("lms_csrf="))
        assert "HttpOnly" in session and "samesite=lax" in session.lower() and "Path=/" in session
        assert "Secure" not in session  # plain HTTP here; LMS_API_COOKIE_SECURE / https turn it on
        assert "Max-Age=3600" in session
        assert "HttpOnly" not in csrf
        assert "Max-Age=2592000" in " ".join(_login(browser, email, remember=True).headers.get_list("set-cookie"))

        assert browser.get("/api/v1/auth/me").json()["email"] == email  # the cookie alone reads
        # A state-changing request on the cookie alone is refused (another site could make it) ...
        r = browser.post("/api/v1/auth/logout")
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]["message"]
        r = browser.post("/api/v1/auth/logout", headers={"X-CSRF-Token": "guess"})
        assert r.status_code == 403
        # ... and goes through with the CSRF cookie's value echoed in the header.
        r = browser.post("/api/v1/auth/logout", headers={"X-CSRF-Token": browser.cookies["lms_csrf"]})
        assert r.status_code == 204
        assert browser.get("/api/v1/auth/me").status_code == 401


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, object], claims: dict[str, object], key: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = _b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing_input}.{sig}"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the HS512 forgery
def test_expired_tampered_foreign_algorithm_and_forged_tokens_are_401(client: httpx.Client, unique: str) -> None:
    email = _register(client, unique)
    good = _login(client, email).json()
    uid = good["user"]["id"]
    key = tokens.signing_key(SECRET)
    ver = 0
    now = int(time.time())
    claims = {"sub": str(uid), "jti": "j" + unique, "ver": ver, "iat": now, "exp": now + 600, "typ": "access"}
    assert client.get("/api/v1/auth/me", headers=_bearer(_forge({"alg": "HS256", "typ": "JWT"}, claims, key))
                      ).status_code == 200  # the forge itself is right: only what follows is wrong
    bad = {
        "expired": jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, key, algorithm="HS256"),
        "tampered": good["access_token"][:-4] + ("AAAA" if not good["access_token"].endswith("AAAA") else "BBBB"),
        "other claims, same signature": ".".join([good["access_token"].split(".")[0],
                                                  _b64(json.dumps({**claims, "sub": "1"}).encode()),
                                                  good["access_token"].split(".")[2]]),
        "alg none": _forge({"alg": "none", "typ": "JWT"}, claims, None),
        "alg RS256 signed with the HMAC key (HS/RS confusion)": _forge({"alg": "RS256", "typ": "JWT"}, claims, key),
        "alg HS512": jwt.encode(claims, key, algorithm="HS512"),
        "wrong key": jwt.encode(claims, b"k" * 32, algorithm="HS256"),
        "raw platform secret as key": jwt.encode(claims, SECRET.encode(), algorithm="HS256"),
        "older token version": jwt.encode({**claims, "ver": -1}, key, algorithm="HS256"),
        "not an access token": jwt.encode({**claims, "typ": "refresh"}, key, algorithm="HS256"),
        "missing jti": jwt.encode({k: v for k, v in claims.items() if k != "jti"}, key, algorithm="HS256"),
        "unknown user": jwt.encode({**claims, "sub": "999999999"}, key, algorithm="HS256"),
        "garbage": "not-a-token",
    }
    for what, token in bad.items():
        r = client.get("/api/v1/auth/me", headers=_bearer(token))
        assert r.status_code == 401, what
        assert r.headers.get("www-authenticate") == "Bearer", what
    assert client.get("/api/v1/auth/me", headers={"Authorization": "Basic abc"}).status_code == 401
    client.cookies.clear()  # the logins above left a session cookie
    assert client.get("/api/v1/auth/me").status_code == 401


def test_password_change_revokes_every_session(client: httpx.Client, unique: str) -> None:
    email = _register(client, unique)
    t1 = _login(client, email).json()["access_token"]
    t2 = _login(client, email, remember=True).json()["access_token"]
    r = client.post("/api/v1/auth/password", headers=_bearer(t1),
                    json={"current_password": "wrong one!!", "new_password": "another long one"})
    assert r.status_code == 403
    r = client.post("/api/v1/auth/password", headers=_bearer(t1),
                    json={"current_password": PASSWORD, "new_password": "short"})
    assert r.status_code == 422
    r = client.post("/api/v1/auth/password", headers=_bearer(t1),
                    json={"current_password": PASSWORD, "new_password": "another long one"})
    assert r.status_code == 204
    for t in (t1, t2):
        assert client.get("/api/v1/auth/me", headers=_bearer(t)).status_code == 401
    assert _login(client, email).status_code == 401
    assert _login(client, email, "another long one").status_code == 200


def test_login_rate_limit_triggers_recovers_and_is_audited(client: httpx.Client, stack: Stack, unique: str) -> None:
    email = _register(client, unique)
    for _ in range(3):  # LMS_LOGIN_MAX_FAILURES=3 for this API (tests/conftest.py)
        assert _login(client, email, "wrong password").status_code == 401
    r = _login(client, email)  # even the right password now waits
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limited"
    # Another account from the same address is not locked out by this one's failures.
    other = _register(client, unique + "b")
    assert _login(client, other).status_code == 200
    wait_until(lambda: _login(client, email).status_code == 200, 10, "the window (3 s) to pass", interval=0.5)
    actions = [r["action"] for r in stack.query(
        "SELECT action FROM audit_log WHERE target = $1 ORDER BY id", email)]
    assert actions[:5] == ["user.created", "auth.login.failed", "auth.login.failed", "auth.login.failed",
                           "auth.login.throttled"]
    assert actions[-1] == "auth.login"


@pytest.mark.parametrize("body, status", [
    (b"not json", 400),
    (b"{}", 422),
    (b'{"email": "a@b.co"}', 422),
    (b'{"email": 5, "password": "x"}', 422),
    (b'{"email": "a@b.co", "password": "x", "admin": true}', 422),
    (b"[]", 422),
])
def test_bad_login_bodies_are_4xx_json(client: httpx.Client, body: bytes, status: int) -> None:
    r = client.post("/api/v1/auth/login", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["message"] and r.json()["request_id"]


@pytest.mark.parametrize("email, password, message", [
    ("not-an-email", PASSWORD, "email"),
    ("x@example.com", "short", "password must be"),
    ("x@example.com", "x" * 300, "password must be"),
])
def test_registration_validates(client: httpx.Client, email: str, password: str, message: str) -> None:
    r = client.post("/api/v1/auth/register", json={"email": email, "password": password})
    assert r.status_code == 422 and message in r.json()["error"]["message"]


def test_duplicate_registration_is_409(client: httpx.Client, unique: str) -> None:
    email = _register(client, unique)
    r = client.post("/api/v1/auth/register", json={"email": email.upper(), "password": PASSWORD})
    assert r.status_code == 409


def test_registration_can_be_turned_off(stack: Stack) -> None:
    closed = stack.start_api(LMS_API_REGISTRATION="off")
    r = httpx.post(closed.url + "/api/v1/auth/register", json={"email": "z@example.com", "password": PASSWORD})
    assert r.status_code == 403 and "turned off" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "forbidden"


def test_login_throttling_holds_across_api_processes(stack: Stack, unique: str) -> None:
    """Two API processes behind a load balancer share one failure count (it is in PostgreSQL)."""
    a = stack.start_api(LMS_LOGIN_MAX_FAILURES="2", LMS_LOGIN_WINDOW_SECONDS="60")
    b = stack.start_api(LMS_LOGIN_MAX_FAILURES="2", LMS_LOGIN_WINDOW_SECONDS="60")
    with httpx.Client(base_url=a.url, timeout=10) as ca, httpx.Client(base_url=b.url, timeout=10) as cb:
        email = _register(ca, unique)
        assert _login(ca, email, "wrong password").status_code == 401
        assert _login(cb, email, "wrong password").status_code == 401
        assert _login(ca, email).status_code == 429
        assert _login(cb, email).status_code == 429


def test_cors_is_off_by_default_and_on_by_setting(api: ApiProcess, stack: Stack) -> None:
    origin = {"Origin": "https://dash.example.com"}
    r = httpx.get(api.url + "/health", headers=origin, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    cors = stack.start_api(LMS_API_CORS_ORIGINS="https://dash.example.com")
    r = httpx.options(cors.url + "/api/v1/auth/me", timeout=10, headers={
        **origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert r.headers.get("access-control-allow-origin") == "https://dash.example.com"
    assert r.headers.get("access-control-allow-credentials") == "true"
    other = httpx.get(cors.url + "/health", headers={"Origin": "https://evil.example"}, timeout=10)
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_lms_user_create_reads_the_password_from_stdin(api: ApiProcess, stack: Stack, unique: str) -> None:
    import subprocess
    import sys

    from tests.harness import REPO

    email = f"{unique}-cli@example.com"
    r = subprocess.run([sys.executable, "-m", "lms_cli.main", "user", "create", email, "--superuser"],
                       input=PASSWORD + "\n", env=stack.env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and "superuser" in r.stdout, r.stderr
    with httpx.Client(base_url=api.url, timeout=10) as c:
        assert _login(c, email).json()["user"]["is_superuser"] is True
    again = subprocess.run([sys.executable, "-m", "lms_cli.main", "user", "create", email], input="short\n",
                           env=stack.env(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().startswith("lms: error: password must be")


def test_forwarded_for_is_believed_only_from_trusted_proxies(stack: Stack, unique: str) -> None:
    """Behind a load balancer the per-address limit counts the real client, and a client
    cannot dodge it by sending its own X-Forwarded-For."""
    limits = {"LMS_LOGIN_MAX_FAILURES": "100", "LMS_LOGIN_ADDRESS_MAX_FAILURES": "2", "LMS_LOGIN_WINDOW_SECONDS": "60"}
    behind_lb = stack.start_api(LMS_API_TRUSTED_PROXIES="127.0.0.1", **limits)
    with httpx.Client(base_url=behind_lb.url, timeout=10) as c:
        emails = [_register(c, f"{unique}-{i}") for i in range(3)]
        a = {"X-Forwarded-For": "198.51.100.7"}
        b = {"X-Forwarded-For": "198.51.100.8, 127.0.0.1"}
        for e in emails[:2]:
            assert c.post("/api/v1/auth/login", json={"email": e, "password": "wrong password"}, headers=a
                          ).status_code == 401
        assert c.post("/api/v1/auth/login", json={"email": emails[2], "password": PASSWORD}, headers=a
                      ).status_code == 429
        assert c.post("/api/v1/auth/login", json={"email": emails[2], "password": PASSWORD}, headers=b
                      ).status_code == 200
    recorded = {r["address"] for r in stack.query("SELECT address FROM login_failures WHERE email = ANY($1)",
                                                    emails[:2])}
    assert recorded == {"198.51.100.7"}
    direct = stack.start_api(**{**limits, "LMS_LOGIN_ADDRESS_MAX_FAILURES": "1000"})
    with httpx.Client(base_url=direct.url, timeout=10) as c:  # no trusted proxy: the header is the client's own
        forged = [_register(c, f"{unique}-d{i}") for i in range(2)]
        for i, e in enumerate(forged):
            assert c.post("/api/v1/auth/login", json={"email": e, "password": "wrong password"},
                          headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code == 401
    recorded = {r["address"] for r in stack.query("SELECT address FROM login_failures WHERE email = ANY($1)",
                                                    forged)}
    assert recorded == {"127.0.0.1"}
