"""Webhook targets: which URLs the platform may call, and how it calls the address it checked.

A webhook URL is chosen by whoever may manage an organization's rules, and the platform
then sends requests to it from inside its own network: server-side request forgery, unless
the target is checked. The API checks a URL when it is saved (:func:`parse_url` and
:func:`resolve`); the sender (bridge/notify.py) checks it again before each attempt, since
a name may resolve elsewhere by then, and connects to the very address it checked
(:meth:`Target.pinned`) rather than letting the HTTP client resolve the name a second time.
With ``LMS_WEBHOOK_ALLOW_PRIVATE=1`` the address checks are skipped (the URL's form is still
checked).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

from lms_core.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS = 2048
#: A name that takes longer than this to resolve is refused (the API answers within it).
RESOLVE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Target:
    """A webhook URL taken apart: what the request goes to, and what it says it goes to."""

    url: str
    scheme: str
    host: str  # a name, or an address without brackets
    port: int
    path: str  # path and query, at least "/"

    def pinned(self, address: IPAddress) -> tuple[str, dict[str, str], dict[str, str]]:
        """(URL, headers, httpx request extensions) of a request to ``address`` that still
        names the URL's host: in the Host header, and for HTTPS as the TLS server name, which
        the certificate is checked against."""
        shown = f"[{address}]" if address.version == 6 else str(address)
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        headers = {"Host": host if self.port == default else f"{host}:{self.port}"}
        extensions = {"sni_hostname": self.host} if self.scheme == "https" else {}
        return f"{self.scheme}://{shown}:{self.port}{self.path}", headers, extensions


def parse_url(url: str) -> Target:
    """The URL's parts, or InvalidInput saying what is wrong with its form: http or https
    only, a host, no user name or password (they would be sent to whoever answers, and hide
    the real host from a reader: ``http://trusted.example@10.0.0.1/``)."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise InvalidInput("the URL may not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"the URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidInput(f"the URL's scheme must be http or https, not {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidInput("the URL may not carry a user name or password; put a token in its path or query, "
                           "and check the X-LMS-Signature header")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidInput("the URL has no host")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url=url, scheme=scheme, host=host, port=port or (443 if scheme == "https" else 80), path=path)


def refused(address: IPAddress) -> str | None:
    """Why the platform may not call ``address`` (its kind of address), or None if it is a
    public unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refused(address.ipv4_mapped)  # ::ffff:127.0.0.1 is 127.0.0.1
    for kind, hit in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                      ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                      ("private", address.is_private), ("reserved", address.is_reserved)):
        if hit:
            return kind
    if not address.is_global:
        return "non-public"  # e.g. shared address space 100.64.0.0/10
    return None


async def resolve(target: Target, *, allow_private: bool) -> list[IPAddress]:
    """The addresses ``target`` connects to, each checked: InvalidInput when any of them is
    not public (unless ``allow_private``), or when the name does not resolve. All of them,
    not just the first: a name with one public and one private address must not be a coin
    toss."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port,
                                                                     type=socket.SOCK_STREAM)
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise InvalidInput(f"the URL's host {target.host!r} does not resolve ({exc or 'timed out'})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
        if not addresses:
            raise InvalidInput(f"the URL's host {target.host!r} has no address")
    if not allow_private:
        for address in addresses:
            kind = refused(address)
            if kind is not None:
                named = "" if literal is not None else f"{target.host!r} resolves to "
                raise InvalidInput(f"the URL's host {named}{address} is a {kind} address; webhooks may only call "
                                   f"public addresses (LMS_WEBHOOK_ALLOW_PRIVATE=1 allows others)")
    return addresses
