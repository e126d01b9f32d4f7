"""Refuse, before any route sees it, text PostgreSQL cannot store and JSON no decoder
should follow.

PostgreSQL's ``text`` takes neither NUL nor invalid UTF-8 (in Python: unpaired surrogates,
which asyncpg cannot even encode). Checked per route, such a value fails deep down — after
an export's headers went out, a cut connection; elsewhere, driver text in a 422. Checked
here, once, for every request: the path, the query string (names and values) and every
string and object key of a JSON body. JSON nested deeper than :data:`MAX_JSON_DEPTH` is
refused too: msgspec's decoder recurses, and past Python's recursion limit it raises
``RecursionError`` (a 500) rather than a decode error.

Every route that takes a body takes JSON, so a body of any other declared type (or of none)
is refused with 415 here, whatever the method or route: a form or multipart body was
otherwise left unchecked and then decoded as JSON anyway (a deep one: a 500), and a
``text/plain`` form, which a browser posts cross-site without a CORS preflight, could log a
victim into the attacker's account (login CSRF). JSON is ``application/json`` or a structured
``application/*+json`` type, parameters (``charset``) aside.

A body is decoded here and again by Litestar: bodies are small (1 MiB at most) and writes
are rare, and checking the decoded strings is the only way to see escapes such as ``\\u0000``.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_document

#: Deeper than any body of this API (device properties are the deepest, a few levels).
MAX_JSON_DEPTH = 64
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_MESSAGE = "text may not contain NUL characters or invalid UTF-8"


def unstorable(text: str) -> bool:
    """True if PostgreSQL would refuse ``text`` in a text column."""
    return _UNSTORABLE.search(text) is not None


def _bad_url_part(raw: bytes) -> bool:
    decoded = urllib.parse.unquote_to_bytes(raw)
    if b"\x00" in decoded:
        return True
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type header value declares JSON (``application/json`` or
    ``application/<anything>+json``, any parameters, any case)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json")
                                            and "/" not in media[len("application/"):])


def check_json(body: bytes) -> tuple[int, str] | None:
    """(status, message) if the body must be refused, else None."""
    try:
        doc = msgspec.json.decode(body)
    except RecursionError:
        return 400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep"
    except (msgspec.DecodeError, UnicodeDecodeError):
        # msgspec also refuses unpaired surrogate escapes ("\ud800") as malformed.
        return 400, "the body is not valid JSON (UTF-8)"
    # Iterative, so a deep document cannot exhaust the stack here either.
    todo: list[tuple[Any, int]] = [(doc, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, str):
            if unstorable(value):
                return 422, f"{UNSTORABLE_MESSAGE} (in the JSON body)"
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return 400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep"
            if isinstance(value, dict):
                for key, item in value.items():
                    if unstorable(key):
                        return 422, f"{UNSTORABLE_MESSAGE} (in a key of the JSON body)"
                    todo.append((item, depth + 1))
            else:
                todo.extend((item, depth + 1) for item in value)
    return None


def input_guard_middleware(max_body: int) -> Any:
    """An ASGI middleware factory; ``max_body`` is the app's request body limit (a larger
    body is answered 413 here, since it must be read whole to be checked)."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            problem: tuple[int, str] | None = None
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogatepass")
            if _bad_url_part(raw_path) or unstorable(scope["path"]):
                problem = 422, f"{UNSTORABLE_MESSAGE} (in the path)"
            elif _bad_url_part(scope.get("query_string", b"")):
                problem = 422, f"{UNSTORABLE_MESSAGE} (in the query string)"
            headers = dict(scope["headers"])
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            if problem is None and has_body:
                chunks: list[bytes] = []
                size = 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left; there is no one to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > max_body:
                        problem = 413, f"the request body is larger than {max_body} bytes"
                        break
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                if problem is None and body:
                    if not is_json_type(content_type):
                        shown = content_type.split(";", 1)[0].strip()[:100] or "none"
                        problem = 415, (f"request bodies must be JSON (Content-Type: application/json); "
                                        f"got Content-Type {shown!r}")
                    else:
                        problem = check_json(body)
                receive = _replay(body, receive)
            if problem is not None:
                await _refuse(scope, send, *problem)
                return
            await app(scope, receive, send)

        return middleware

    return factory


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the buffered body over once, then waits on the client as before
    (a streamed response listens on it for the disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    rid = str(scope.get("state", {}).get("request_id", ""))
    payload = msgspec.json.encode(error_document(status, message, rid))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
