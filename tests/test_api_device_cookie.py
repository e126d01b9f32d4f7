"""OWASP's "device cookie" against a real ``lms api``: an attacker sharing the owner's
address (NAT, proxy, localhost) who fails enough logins for the owner's account locks that
(account, address) pair, yet the owner presenting the device token of an earlier login
still gets in; a forged token or another account's does not help, and a device token's own
failures lock only that token."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.harness import ApiProcess, Stack
from tests.test_api_access import PASSWORD

LOGIN = "/api/v1/auth/login"
MAX = 5


@pytest.fixture(scope="module")
def api_own(stack: Stack) -> Iterator[ApiProcess]:
    """Today's limits, with a window no test outlasts."""
    api = stack.start_api(LMS_LOGIN_MAX_FAILURES=str(MAX), LMS_LOGIN_WINDOW_SECONDS="600",
                          LMS_LOGIN_ADDRESS_MAX_FAILURES="1000")
    yield api
    api.stop()


def _register(api: ApiProcess, email: str) -> None:
    with httpx.Client(base_url=api.url, timeout=15) as c:
        assert c.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD}).status_code == 201


def _login(api: ApiProcess, email: str, password: str, *, cookie: str | None = None,
           header: str | None = None) -> httpx.Response:
    with httpx.Client(base_url=api.url, timeout=15) as c:
        if cookie is not None:
            c.cookies.set("lms_device", cookie, path="/api/v1/auth")
        headers = {"X-LMS-Device": header} if header is not None else {}
        return c.post(LOGIN, json={"email": email, "password": password}, headers=headers)


def _browser_login(api: ApiProcess, email: str) -> str:
    """A browser's login: the device token it keeps, as a cookie scoped to the auth routes."""
    with httpx.Client(base_url=api.url, timeout=15) as browser:
        r = browser.post(LOGIN, json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        set_cookie = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("lms_device=")]
        assert set_cookie, r.headers
        flags = set_cookie[0].lower()
        assert "httponly" in flags and "samesite=lax" in flags and "path=/api/v1/auth" in flags, flags
        token = browser.cookies.get("lms_device", path="/api/v1/auth")
        assert token and token == r.json()["device_token"]
        return token


def test_the_owner_with_a_device_token_gets_in_despite_an_attacker_at_the_same_address(
        api_own: ApiProcess, unique: str) -> None:
    owner, attacker = f"{unique}-owner@example.com", f"{unique}-attacker@example.com"
    _register(api_own, owner)
    _register(api_own, attacker)
    device = _browser_login(api_own, owner)
    second_device = _browser_login(api_own, owner)
    attackers_own = _browser_login(api_own, attacker)

    # The attacker, at the owner's (known) address, fails until the pair is locked.
    statuses = [_login(api_own, owner, f"wrong guess {i}").status_code for i in range(MAX + 2)]
    assert statuses[:MAX] == [401] * MAX and statuses[MAX:] == [429, 429], statuses
    # Without a device token the owner is locked out too (today's limits still hold) ...
    assert _login(api_own, owner, PASSWORD).status_code == 429
    # ... with the device cookie of an earlier login, or its token in the header, they get in.
    r = _login(api_own, owner, PASSWORD, cookie=device)
    assert r.status_code == 200, r.text
    assert _login(api_own, owner, PASSWORD, header=second_device).status_code == 200
    # A success through a device token gives the attacker no fresh allowance.
    assert _login(api_own, owner, "wrong again").status_code == 429

    # Forged, tampered, or another account's (the attacker's own) tokens are as good as none.
    user_id, issued, nonce, mac = device.split(".")
    forged = [f"{user_id}.{issued}.{nonce}.{'A' * len(mac)}", f"{user_id}.{issued}.{nonce[::-1]}.{mac}",
              f"{int(user_id) + 1}.{issued}.{nonce}.{mac}", "garbage", "a.b.c.d", attackers_own]
    for token in forged:
        assert _login(api_own, owner, PASSWORD, cookie=token).status_code == 429, token
        assert _login(api_own, owner, PASSWORD, header=token).status_code == 429, token


def test_a_device_tokens_own_failures_lock_only_that_token(api_own: ApiProcess, unique: str) -> None:
    owner = f"{unique}-owner@example.com"
    _register(api_own, owner)
    stolen = _browser_login(api_own, owner)
    other = _browser_login(api_own, owner)
    statuses = [_login(api_own, owner, f"wrong guess {i}", header=stolen).status_code for i in range(MAX + 1)]
    assert statuses == [401] * MAX + [429], statuses
    assert _login(api_own, owner, PASSWORD, header=stolen).status_code == 429  # that token is locked
    assert _login(api_own, owner, PASSWORD, header=other).status_code == 200
    # Its failures were not counted at the address: a login without a token still gets in.
    assert _login(api_own, owner, PASSWORD).status_code == 200
