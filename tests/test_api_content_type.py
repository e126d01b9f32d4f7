"""Request bodies that are not declared as JSON, against a real ``lms api``: every route that
takes a body takes JSON only, so anything else is a 415 in our words, before any decoder
runs (a deep document under a form content type was a 500; a ``text/plain`` form, which a
browser sends cross-site without a preflight, logged the victim into the attacker's
account)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import ApiProcess, Stack
from tests.test_api_access import PASSWORD, User

ORG = "ctype"
DEEP = b'{"slug": "n1", "properties": ' + b"[" * 3000 + b"]" * 3000 + b"}"
NUL = b'{"slug": "n2", "name": "a\\u0000b", "properties": {"k\\u0000": 1}}'
LOGIN = json.dumps({"email": "ctype-owner@example.com", "password": PASSWORD}).encode()
FORM = b"email=ctype-owner%40example.com&password=x"

CONTENT_TYPES = ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "Multipart/Form-Data",
                 "text/plain", "text/plain; charset=utf-8", "application/xml", "application/jsonp",
                 "text/json", None]
BODIES = {"deep": DEEP, "nul": NUL, "valid login": LOGIN, "form": FORM}
ROUTES = [("POST", "/api/v1/auth/login", False), ("POST", "/api/v1/auth/register", False),
          ("POST", f"/api/v1/orgs/{ORG}/devices", True), ("PATCH", f"/api/v1/orgs/{ORG}/devices/d1", True)]


@pytest.fixture(scope="module")
def ctype(stack: Stack) -> Iterator[dict[str, Any]]:
    """An API process of its own, so its log holds only these requests."""
    api: ApiProcess = stack.start_api()
    owner = User(api, "ctype-owner@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": ORG}).status_code == 201
    assert owner.call("POST", f"/api/v1/orgs/{ORG}/devices", {"slug": "d1"}).status_code == 201
    yield {"api": api, "headers": dict(owner.client.headers)}
    owner.client.close()
    api.stop()


def _send(api: ApiProcess, method: str, path: str, body: bytes, content_type: str | None,
          headers: dict[str, str]) -> httpx.Response:
    headers = dict(headers)
    if content_type is not None:
        headers["content-type"] = content_type
    with httpx.Client(base_url=api.url, timeout=15) as client:
        r = client.request(method, path, content=body, headers=headers)
        r.read()
    return r


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_bodies_not_declared_json_are_a_415_in_our_words(ctype: dict[str, Any], content_type: str | None) -> None:
    api: ApiProcess = ctype["api"]
    log_before = api.log.stat().st_size
    for method, path, auth in ROUTES:
        for name, body in BODIES.items():
            r = _send(api, method, path, body, content_type, ctype["headers"] if auth else {})
            where = (method, path, content_type, name)
            assert r.status_code == 415, (where, r.status_code, r.text[:300])
            doc = r.json()
            assert set(doc) == {"error", "request_id"}, (where, doc)
            assert doc["error"]["status"] == 415 and doc["error"]["code"] == "unsupported_media_type", doc
            assert "JSON" in doc["error"]["message"], doc
            assert "set-cookie" not in r.headers, where
    with open(api.log, "rb") as f:
        f.seek(log_before)
        logged = f.read().decode(errors="replace")
    assert "Traceback" not in logged, logged[-3000:]


def test_a_text_plain_form_cannot_log_anyone_in(ctype: dict[str, Any]) -> None:
    """What ``<form enctype="text/plain">`` posts cross-site with one field named
    ``{"email":"…","password":"pre`` and valued ``post"}``: valid JSON, but not declared so."""
    api: ApiProcess = ctype["api"]
    body = b'{"email":"ctype-owner@example.com","password":"' + PASSWORD.encode() + b'"}'
    r = _send(api, "POST", "/api/v1/auth/login", body, "text/plain",
              {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 415, r.text
    assert not r.cookies and "set-cookie" not in r.headers


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/merge-patch+json"])
def test_json_content_types_are_still_taken(ctype: dict[str, Any], content_type: str) -> None:
    api: ApiProcess = ctype["api"]
    r = _send(api, "POST", "/api/v1/auth/login", LOGIN, content_type, {})
    assert r.status_code == 200, r.text
    r = _send(api, "PATCH", f"/api/v1/orgs/{ORG}/devices/d1", b'{"name": "ok"}', content_type, ctype["headers"])
    assert r.status_code == 200, r.text
    # The guard still reads JSON bodies: a deep one is refused, not decoded.
    r = _send(api, "PATCH", f"/api/v1/orgs/{ORG}/devices/d1", DEEP, content_type, ctype["headers"])
    assert r.status_code == 400, r.text


def test_requests_without_a_body_need_no_content_type(ctype: dict[str, Any]) -> None:
    api: ApiProcess = ctype["api"]
    with httpx.Client(base_url=api.url, timeout=15, headers=ctype["headers"]) as client:
        assert client.get(f"/api/v1/orgs/{ORG}/devices/d1", headers={"content-type": "text/plain"}).status_code == 200
        r = client.post(f"/api/v1/orgs/{ORG}/devices/d1/enable", headers={"content-type": "text/plain"})
        assert r.status_code == 200, r.text
        assert client.post(f"/api/v1/orgs/{ORG}/devices/d1/enable").status_code == 200
