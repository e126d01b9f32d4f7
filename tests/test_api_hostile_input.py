"""Hostile input against a real ``lms api``: every answer is a 4xx in our own words, with
the one JSON error shape, and the API logs no traceback.

Covers text PostgreSQL cannot store (NUL, unpaired surrogates) in every kind of input,
JSON nested too deep, forged cursors, over-long emails, and database driver text leaking
into answers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import ApiProcess, Stack
from tests.test_api_access import User

ORG = "hostile"
DEVICE = f"/api/v1/orgs/{ORG}/devices/d1"
DEEP = b"[" * 1500 + b"]" * 1500
DEEP_FIELD = b'{"email": ' + b"[" * 1200 + b"]" * 1200 + b', "password": "x"}'
LONG_EMAIL = "a" * 64 + "@" + "b" * 189 + "." + "c" * 60  # 315 characters; the database allows 254
DRIVER_WORDS = ("asyncpg", "invalid input syntax", "DataError", "violates", "invalid byte sequence",
                "UTF8", "Traceback", "PostgresError", "0x00")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


JUNK = _b64(bytes(range(256)))
NOT_A_TIME = _b64(b'["x", "y"]')
NUMBERS = _b64(b"[1, 2]")
OBJECT_METRIC = _b64(b'["2024-01-01T00:00:00+00:00", {"a": 1}]')
NUL_TYPE = _b64(b'["2024-01-01T00:00:00+00:00", "a\\u0000"]')


#: (name, method, path, body as raw bytes or a JSON-able value or None, authenticated, status)
CASES: list[tuple[str, str, str, Any, bool, int]] = [
    # JSON nested deeper than any decoder should follow
    ("deep json on login", "POST", "/api/v1/auth/login", DEEP, False, 400),
    ("deep json on register", "POST", "/api/v1/auth/register", DEEP, False, 400),
    ("deep json in a field", "POST", "/api/v1/auth/login", DEEP_FIELD, False, 400),
    ("deep json on an org route", "PATCH", DEVICE, DEEP, True, 400),
    ("deep json on create org", "POST", "/api/v1/orgs", DEEP, True, 400),
    ("body not utf-8", "POST", "/api/v1/auth/login", b'{"email": "\xff\xfe", "password": "x"}', False, 400),
    # forged cursors
    ("cursor garbage", "GET", f"{DEVICE}/readings?cursor=garbage", None, True, 422),
    ("cursor base64 of junk bytes", "GET", f"{DEVICE}/readings?cursor={JUNK}", None, True, 422),
    ("cursor not a time", "GET", f"{DEVICE}/readings?cursor={NOT_A_TIME}", None, True, 422),
    ("cursor numbers", "GET", f"{DEVICE}/readings?cursor={NUMBERS}", None, True, 422),
    ("cursor object metric", "GET",
     f"{DEVICE}/readings?cursor={OBJECT_METRIC}", None, True, 422),
    ("events cursor not a time", "GET", f"{DEVICE}/events?cursor={NOT_A_TIME}", None, True, 422),
    ("events cursor nul type", "GET",
     f"{DEVICE}/events?cursor={NUL_TYPE}", None, True, 422),
    # emails longer than the column
    ("long email register", "POST", "/api/v1/auth/register", {"email": LONG_EMAIL, "password": "x" * 12},
     False, 422),
    ("long email login", "POST", "/api/v1/auth/login", {"email": LONG_EMAIL, "password": "x" * 12}, False, 422),
    ("long email member", "PUT", f"/api/v1/orgs/{ORG}/members/{LONG_EMAIL}", {"role": "viewer"}, True, 404),
    # NUL and unpaired surrogates: query, path, body field, nested key
    ("nul in query", "GET", f"{DEVICE}/readings?metric=%00", None, True, 422),
    ("nul in aggregate query", "GET", f"{DEVICE}/readings/aggregate?metric=a%00b", None, True, 422),
    ("nul in query name", "GET", f"{DEVICE}/readings?me%00tric=x", None, True, 422),
    ("nul in export query", "GET", f"{DEVICE}/export?format=csv&metric=%00", None, True, 422),
    ("surrogate in query", "GET", f"{DEVICE}/readings?metric=%ED%A0%80", None, True, 422),
    ("nul in path", "GET", f"/api/v1/orgs/{ORG}/devices/%00", None, True, 422),
    ("nul in org path", "GET", "/api/v1/orgs/a%00b/devices", None, True, 422),
    ("surrogate in path", "GET", f"/api/v1/orgs/{ORG}/devices/%ED%A0%80", None, True, 422),
    ("nul in body field", "PATCH", DEVICE, {"name": "a\u0000b"}, True, 422),
    ("nul in login email", "POST", "/api/v1/auth/login", {"email": "a\u0000@example.com", "password": "x" * 12},
     False, 422),
    ("nul in nested key", "PATCH", DEVICE, {"properties": {"a": {"b\u0000": 1}}}, True, 422),
    ("nul in nested value", "PATCH", DEVICE, {"properties": {"a": ["ok", "b\u0000"]}}, True, 422),
    ("surrogate in body", "PATCH", DEVICE, b'{"name": "a\\ud800b"}', True, 400),
]


@pytest.fixture(scope="module")
def hostile(stack: Stack) -> Iterator[dict[str, Any]]:
    """An API process of its own, so its log holds only these requests."""
    api: ApiProcess = stack.start_api()
    owner = User(api, "hostile-owner@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": ORG}).status_code == 201
    assert owner.call("POST", f"/api/v1/orgs/{ORG}/devices", {"slug": "d1"}).status_code == 201
    yield {"api": api, "headers": dict(owner.client.headers)}
    owner.client.close()
    api.stop()


@pytest.mark.parametrize(("name", "method", "path", "body", "auth", "status"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_4xx_in_our_words(hostile: dict[str, Any], name: str, method: str, path: str,
                                             body: Any, auth: bool, status: int) -> None:
    api: ApiProcess = hostile["api"]
    headers = dict(hostile["headers"]) if auth else {}
    if isinstance(body, bytes):
        content = body
    elif body is not None:
        content = json.dumps(body).encode()  # ensure_ascii: NUL travels as the escape \u0000
    else:
        content = None
    if content is not None:
        headers["content-type"] = "application/json"
    log_before = api.log.stat().st_size
    with httpx.Client(base_url=api.url, timeout=15) as client:
        try:
            r = client.request(method, path, content=content, headers=headers)
            r.read()
        except httpx.HTTPError as exc:  # e.g. a stream cut after its headers
            pytest.fail(f"{name}: no complete answer: {exc!r}")
    assert r.status_code == status, (name, r.status_code, r.text[:500])
    doc = r.json()
    assert set(doc) == {"error", "request_id"}, doc
    assert {"status", "code", "message"} <= set(doc["error"]), doc
    assert doc["error"]["status"] == status and isinstance(doc["error"]["message"], str), doc
    assert doc["request_id"] == r.headers["x-request-id"]
    for word in DRIVER_WORDS:
        assert word.lower() not in r.text.lower(), (name, word, r.text[:500])
    with open(api.log, "rb") as f:
        f.seek(log_before)
        logged = f.read().decode(errors="replace")
    assert "Traceback" not in logged, logged[-3000:]


def test_the_api_still_serves_after_the_hostile_inputs(hostile: dict[str, Any]) -> None:
    r = httpx.get(hostile["api"].url + DEVICE, headers=hostile["headers"], timeout=10)
    assert r.status_code == 200, r.text
    assert "Traceback" not in hostile["api"].log.read_text(errors="replace")
