"""The dashboard: a small single-page app (``api/web/``) served by the API itself.

``GET /`` is the page, ``/app/...`` its modules, style sheet and icon; all of them are
public files (like ``/health``), the data behind them is not: the page signs in through
``/api/v1/auth/login`` and then uses the same REST and WebSocket API as every other client
(the cookie session, with the ``X-CSRF-Token`` header on unsafe calls). Nothing here is an
organization route, so ``check_routes`` has nothing to say about it.

The page gets a strict Content-Security-Policy: scripts, styles and images only from this
origin, no inline script or style attribute, no ``eval``; connections to this origin and its
WebSocket twins (``ws://`` and ``wss://`` of the same host: CSP level 2 browsers do not count
them as ``'self'``). Device data never reaches the page as HTML (the scripts build text nodes),
so even a hostile device name has nothing to run; the policy is the second wall.

The role matrix the page uses to hide what a role may not do is the API's own
(:data:`api.access.MATRIX`), handed to the page as a JSON data block (not a script: the
policy would refuse that, and it is never executed), so there is one table to change.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import CacheControlHeader
from litestar.router import Router
from litestar.static_files import create_static_files_router

from api.access import MATRIX

WEB = Path(__file__).resolve().parent / "web"
#: The page's placeholder for the role matrix (a JSON data block in index.html).
_MATRIX_SLOT = "{{PERMISSIONS}}"
#: A Host header we are willing to repeat in the policy: a DNS name or an IPv4 or bracketed
#: IPv6 address, with an optional port. Anything else (a header injection attempt) is left
#: out, and the page falls back to ``'self'`` alone.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


def content_security_policy(host: str) -> str:
    """The page's policy for a request that named ``host`` (its Host header)."""
    connect = "'self'"
    if _HOST.fullmatch(host):
        # Both: behind a proxy that ends TLS the API sees http while the page speaks wss
        # (a browser never lets an https page use plain ws: anyway, mixed content).
        connect += f" ws://{host} wss://{host}"
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src {connect}; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


#: Sent with every dashboard file; the policy only with the page (it governs documents).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@functools.cache
def _page() -> bytes:
    """index.html with the role matrix filled in (read once, on first use)."""
    matrix = {perm: sorted(roles) for perm, roles in MATRIX.items()}
    # "<" escaped so the data block can never end early, whatever a future permission is called.
    data = json.dumps(matrix, sort_keys=True).replace("<", "\\u003c")
    return (WEB / "index.html").read_text(encoding="utf-8").replace(_MATRIX_SLOT, data).encode()


@get("/", include_in_schema=False, opt={"exclude_from_auth": True}, media_type="text/html; charset=utf-8")
async def dashboard(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The dashboard page (public: it holds no data; it signs in like any other client)."""
    host = request.headers.get("host", "")
    headers = {**SECURITY_HEADERS, "Content-Security-Policy": content_security_policy(host),
               "Cache-Control": "no-cache"}
    return Response(_page(), headers=headers, media_type="text/html; charset=utf-8")


def _add_headers(response: Any) -> Any:
    response.headers.update(SECURITY_HEADERS)
    return response


def dashboard_files() -> Router:
    """``/app/...``: the page's modules, style sheet and icon (revalidated on every load, so
    an upgraded API never runs with yesterday's scripts)."""
    return create_static_files_router(
        path="/app", directories=[WEB / "app"], name="dashboard", opt={"exclude_from_auth": True},
        include_in_schema=False, cache_control=CacheControlHeader(no_cache=True), after_request=_add_headers,
    )
