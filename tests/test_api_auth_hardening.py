"""Issue 6, points 3, 9, 10 and 12, attacked through real API processes on a real database:
concurrent login guesses, registration floods, lock-out of the owner, audit flooding,
retention, and CSRF tokens carried over from another session."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from lms_cli.main import build_parser
from lms_core.settings import Settings
from tests.harness import ApiProcess, Stack, wait_until

PASSWORD = "correct horse battery"


def _register(api: ApiProcess, email: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(api.url + "/api/v1/auth/register", json={"email": email, "password": PASSWORD},
                      headers=headers or {}, timeout=60)


def _login(api: ApiProcess, email: str, password: str = PASSWORD, address: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": address} if address else {}
    return httpx.post(api.url + "/api/v1/auth/login", json={"email": email, "password": password},
                      headers=headers, timeout=120)


# -- 3: count-and-decide is atomic --------------------------------------------------------

def test_a_concurrent_burst_through_two_api_processes_gets_only_the_limit_evaluated(stack: Stack,
                                                                                   unique: str) -> None:
    limits = {"LMS_LOGIN_MAX_FAILURES": "5", "LMS_LOGIN_ACCOUNT_MAX_FAILURES": "1000",
              "LMS_LOGIN_ADDRESS_MAX_FAILURES": "100000", "LMS_LOGIN_WINDOW_SECONDS": "600"}
    apis = [stack.start_api(**limits), stack.start_api(**limits)]
    email = f"{unique}@example.com"
    assert _register(apis[0], email).status_code == 201
    burst = 100
    barrier = threading.Barrier(burst)

    def guess(i: int) -> int:
        barrier.wait()  # all at once, half through each API process
        return _login(apis[i % 2], email, "wrong password").status_code

    with ThreadPoolExecutor(max_workers=burst) as pool:
        futures = [pool.submit(guess, i) for i in range(burst)]
        # The right password, once the limit's worth of guesses is on record.
        wait_until(lambda: stack.scalar("SELECT count(*) FROM login_failures WHERE email = $1", email) >= 5,
                   120, "the first guesses to be recorded")
        right = _login(apis[1], email)
        statuses = [f.result() for f in futures]
    assert statuses.count(401) == 5, sorted(statuses)  # exactly the limit was checked against the hash
    assert statuses.count(429) == burst - 5
    assert right.status_code == 429, right.text
    # Nothing wiped the record: the account stays throttled for the window.
    assert stack.scalar("SELECT count(*) FROM login_failures WHERE email = $1", email) == 5
    assert _login(apis[0], email).status_code == 429
    failed = stack.scalar("SELECT count(*) FROM audit_log WHERE action = 'auth.login.failed' AND target = $1", email)
    assert failed == 5


# -- 9: registration off by default, rate-limited when on --------------------------------

def test_registration_is_off_by_default_and_lms_up_has_a_switch() -> None:
    base = {"LMS_DATABASE_URL": "postgresql://x@y/z", "LMS_MQTT_URL": "mqtt://a:b@c", "LMS_SECRET_KEY": "s" * 32}
    assert Settings.from_env(base).api.registration is False
    assert Settings.from_env({**base, "LMS_API_REGISTRATION": "on"}).api.registration is True
    assert build_parser().parse_args(["up", "--registration"]).registration is True
    assert build_parser().parse_args(["up"]).registration is False


def test_registration_burst_from_one_address_is_limited_across_processes(stack: Stack, unique: str) -> None:
    env = {"LMS_API_REGISTRATION_MAX_PER_ADDRESS": "3", "LMS_API_REGISTRATION_WINDOW_SECONDS": "600",
           "LMS_API_TRUSTED_PROXIES": "127.0.0.1"}
    apis = [stack.start_api(**env), stack.start_api(**env)]
    burst = 12
    barrier = threading.Barrier(burst)
    address = {"X-Forwarded-For": "198.51.100.90"}

    def sign_up(i: int) -> httpx.Response:
        barrier.wait()
        return _register(apis[i % 2], f"{unique}-{i}@example.com", address)

    with ThreadPoolExecutor(max_workers=burst) as pool:
        answers = list(pool.map(sign_up, range(burst)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 3 + [429] * (burst - 3), codes
    refused = next(r for r in answers if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "rate_limited"
    assert stack.scalar("SELECT count(*) FROM users WHERE email LIKE $1", f"{unique}-%") == 3
    # Another address is not held by this one's sign-ups.
    assert _register(apis[0], f"{unique}-other@example.com", {"X-Forwarded-For": "198.51.100.91"}
                     ).status_code == 201


# -- 10: no lock-out of the owner, bounded audit rows, retention ---------------------------

def test_failures_from_elsewhere_do_not_lock_the_owner_out(stack: Stack, unique: str) -> None:
    api = stack.start_api(LMS_API_TRUSTED_PROXIES="127.0.0.1", LMS_LOGIN_MAX_FAILURES="3",
                          LMS_LOGIN_ACCOUNT_MAX_FAILURES="6", LMS_LOGIN_ADDRESS_MAX_FAILURES="5",
                          LMS_LOGIN_WINDOW_SECONDS="600")
    owner = f"{unique}@example.com"
    assert _register(api, owner).status_code == 201
    home = "203.0.113.10"
    assert _login(api, owner, address=home).status_code == 200
    # An attacker spreads guesses over several addresses until the account's own limit trips.
    for attacker in ("203.0.113.21", "203.0.113.22", "203.0.113.23"):
        for _ in range(3):
            assert _login(api, owner, "wrong password", attacker).status_code in (401, 429)
    assert _login(api, owner, address="203.0.113.21").status_code == 429
    assert _login(api, owner, address="203.0.113.30").status_code == 429  # a new address waits
    assert _login(api, owner, address=home).status_code == 200  # the owner, from home, does not


def test_throttled_attempts_share_one_audit_row(stack: Stack, unique: str) -> None:
    api = stack.start_api(LMS_API_TRUSTED_PROXIES="127.0.0.1", LMS_LOGIN_MAX_FAILURES="2",
                          LMS_LOGIN_ADDRESS_MAX_FAILURES="4", LMS_LOGIN_WINDOW_SECONDS="600")
    email = f"{unique}@example.com"
    assert _register(api, email).status_code == 201
    for _ in range(2):
        assert _login(api, email, "wrong password", "203.0.113.50").status_code == 401
    for _ in range(25):
        assert _login(api, email, "wrong password", "203.0.113.50").status_code == 429
    rows = stack.query("SELECT action, detail FROM audit_log WHERE target = $1 AND action LIKE 'auth.login%' "
                       "ORDER BY id", email)
    assert [r["action"] for r in rows] == ["auth.login.failed"] * 2 + ["auth.login.throttled"]
    assert json.loads(rows[-1]["detail"])["count"] == 25
    # An address over its own limit that invents a new email per attempt: still one row.
    for i in range(24):
        status = _login(api, f"{unique}-{i}@example.com", "wrong password", "203.0.113.51").status_code
        assert status == (401 if i < 4 else 429)
    rows = stack.query("SELECT target, detail FROM audit_log WHERE action = 'auth.login.throttled' "
                       "AND address = '203.0.113.51'")
    assert [(r["target"], json.loads(r["detail"])["count"]) for r in rows] == [("*", 20)]


def test_failures_behind_a_shared_address_do_not_lock_out_who_logged_in_there(stack: Stack, unique: str) -> None:
    """Failures against many accounts from an office's address: the superuser who logged in
    from there before still gets in; a stranger from that address waits."""
    api = stack.start_api(LMS_API_TRUSTED_PROXIES="127.0.0.1", LMS_LOGIN_ADDRESS_MAX_FAILURES="5",
                          LMS_LOGIN_WINDOW_SECONDS="600")
    office = "203.0.113.40"
    admin = f"{unique}-super@example.com"
    assert _register(api, admin).status_code == 201
    stack.query("UPDATE users SET is_superuser = true WHERE email = $1", admin)
    assert _login(api, admin, address=office).status_code == 200
    for i in range(5):
        assert _login(api, f"{unique}-nobody{i}@example.com", "wrong password", office).status_code == 401
    stranger = f"{unique}-new@example.com"
    assert _register(api, stranger).status_code == 201
    assert _login(api, stranger, address=office).status_code == 429
    r = _login(api, admin, address=office)
    assert r.status_code == 200 and r.json()["user"]["is_superuser"] is True


def test_the_api_prunes_old_rows(own_stack: Stack, unique: str) -> None:
    s = own_stack
    s.query("INSERT INTO users (email, password_hash) VALUES ($1, 'x')", f"{unique}@example.com")
    uid = s.scalar("SELECT id FROM users WHERE email = $1", f"{unique}@example.com")
    s.query("INSERT INTO login_failures (email, address, at) VALUES ('old@x.io', 'a', now() - interval '2 hours'), "
            "('new@x.io', 'a', now())")
    s.query("INSERT INTO revoked_tokens (jti, expires_at) VALUES ('old', now() - interval '1 minute'), "
            "('new', now() + interval '1 hour')")
    s.query("INSERT INTO audit_log (action, at) VALUES ('test.old', now() - interval '31 days'), "
            "('test.new', now() - interval '29 days')")
    s.query("INSERT INTO registration_attempts (address, at) VALUES ('old', now() - interval '2 hours'), "
            "('new', now())")
    s.query("INSERT INTO login_known_addresses (user_id, address, last_success_at) VALUES "
            "($1, 'old', now() - interval '91 days'), ($1, 'new', now())", uid)
    s.start_api(LMS_RETENTION_SWEEP_SECONDS="1", LMS_AUDIT_RETENTION_DAYS="30", LMS_LOGIN_WINDOW_SECONDS="3600",
                LMS_API_REGISTRATION_WINDOW_SECONDS="3600", LMS_LOGIN_KNOWN_ADDRESS_DAYS="90")

    def left() -> list[str]:
        return sorted(
            [r[0] for r in s.query("SELECT email FROM login_failures")]
            + [r[0] for r in s.query("SELECT jti FROM revoked_tokens")]
            + [r[0] for r in s.query("SELECT action FROM audit_log WHERE action LIKE 'test.%'")]
            + [r[0] for r in s.query("SELECT address FROM registration_attempts")]
            + [r[0] for r in s.query("SELECT address FROM login_known_addresses")])

    wait_until(lambda: left() == sorted(["new@x.io", "new", "test.new", "new", "new"]), 30,
               f"the retention sweep (left: {left()})", interval=0.5)


# -- 12: the CSRF token is bound to the session ---------------------------------------------

def test_a_csrf_token_of_another_session_is_refused(api: ApiProcess, unique: str) -> None:
    email = f"{unique}@example.com"
    assert _register(api, email).status_code == 201
    a = _login(api, email)
    b = _login(api, email)
    csrf_a, session_b = a.json()["csrf_token"], b.cookies["lms_session"]
    assert a.cookies["lms_csrf"] == csrf_a and b.json()["csrf_token"] != csrf_a
    with httpx.Client(base_url=api.url, timeout=10) as browser:
        # A sibling subdomain planted session A's CSRF pair in the browser that holds session B.
        browser.cookies.set("lms_session", session_b)
        browser.cookies.set("lms_csrf", csrf_a)
        r = browser.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf_a})
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]["message"]
        assert browser.get("/api/v1/auth/me").status_code == 200  # still logged in
        browser.cookies.set("lms_csrf", b.json()["csrf_token"])
        r = browser.post("/api/v1/auth/logout", headers={"X-CSRF-Token": b.json()["csrf_token"]})
        assert r.status_code == 204
