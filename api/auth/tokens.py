"""JWT access tokens: HS256 only, with a key derived from LMS_SECRET_KEY.

Claims: ``sub`` (user id), ``jti`` (revocation on logout), ``ver`` (the user's token
version; a password change bumps it and so revokes every older token), ``iat``, ``exp``.
Decoding pins the algorithm list to HS256, which refuses ``none`` and any RS/ES token
(no HS/RS confusion: there is no public key to confuse with).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"


class InvalidToken(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: int
    jti: str
    version: int
    expires_at: int


def signing_key(secret: str) -> bytes:
    # Its own key: the platform secret also derives device passwords.
    return hmac.new(secret.encode(), b"lms access token v1", hashlib.sha256).digest()


def csrf_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"lms csrf token v1", hashlib.sha256).digest()


def csrf_token(key: bytes, jti: str) -> str:
    """HMAC of the session's token id: bound to that one session, and unforgeable without
    the secret (a double-submit cookie alone can be planted by a sibling subdomain)."""
    return base64.urlsafe_b64encode(hmac.new(key, jti.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


def issue(key: bytes, user_id: int, version: int, ttl_s: int) -> tuple[str, Claims]:
    now = int(time.time())
    claims = Claims(user_id=user_id, jti=secrets.token_urlsafe(16), version=version, expires_at=now + ttl_s)
    token = jwt.encode({"sub": str(user_id), "jti": claims.jti, "ver": version, "iat": now,
                        "exp": claims.expires_at, "typ": "access"}, key, algorithm=ALGORITHM)
    return token, claims


def decode(key: bytes, token: str) -> Claims:
    try:
        data = jwt.decode(token, key, algorithms=[ALGORITHM],
                          options={"require": ["sub", "jti", "ver", "iat", "exp"]})
        if data.get("typ") != "access":
            raise InvalidToken("not an access token")
        return Claims(user_id=int(data["sub"]), jti=str(data["jti"]), version=int(data["ver"]),
                      expires_at=int(data["exp"]))
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise InvalidToken(str(exc)) from None


def device_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"lms device token v1", hashlib.sha256).digest()


def _device_mac(key: bytes, payload: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, payload.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


def device_token(key: bytes, user_id: int) -> str:
    """A device token (OWASP's "device cookie") for a successful login of ``user_id``:
    ``<user id>.<issued at>.<random nonce>.<HMAC of those>``. Unforgeable without the secret;
    the nonce tells one browser's token from another's."""
    payload = f"{user_id}.{int(time.time())}.{secrets.token_urlsafe(16)}"
    return f"{payload}.{_device_mac(key, payload)}"


def read_device_token(key: bytes, token: str, max_age_s: int) -> tuple[int, str] | None:
    """(user id, nonce) of a genuine device token not older than ``max_age_s``, else None."""
    parts = token.split(".")
    if len(token) > 200 or len(parts) != 4:
        return None
    payload = ".".join(parts[:3])
    if not hmac.compare_digest(parts[3].encode(), _device_mac(key, payload).encode()):
        return None
    try:
        user_id, issued = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if not 0 <= time.time() - issued <= max_age_s:
        return None
    return user_id, parts[2]
