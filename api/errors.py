"""Errors as JSON with one stable shape, everywhere:

    {"error": {"status": 404, "code": "not_found", "message": "...", "details": [...]?},
     "request_id": "..."}

Domain errors of the shared core are translated here, and only here.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from api.services.errors import CommandNotSent, Conflict, Forbidden, RateLimited, Unauthenticated
from lms_core.db import is_connection_error, translate
from lms_core.errors import AlreadyExists, BrokerError, InvalidInput, LmsError, NotFound, StorageError

log = logging.getLogger("lms.api")

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid",
          429: "rate_limited", 500: "internal_error", 503: "unavailable"}


def error_document(status: int, message: str, request_id: str, details: Any = None) -> dict[str, Any]:
    """The error body; also written by the ASGI middlewares that answer before Litestar."""
    body: dict[str, Any] = {"status": status, "code": _CODES.get(status, "error"), "message": message}
    if details:
        body["details"] = details
    return {"error": body, "request_id": request_id}


def error_response(request: Request[Any, Any, Any], status: int, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    rid = request.scope.get("state", {}).get("request_id", "")
    return Response(error_document(status, message, rid, details), status_code=status, headers=headers)


def http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    details = exc.extra if isinstance(exc, ValidationException) else None
    status = exc.status_code
    message = exc.detail or _CODES.get(status, "error")
    if status == 400 and details:
        status = 422  # the body or query was understood but is not valid
    return error_response(request, status, message, details, headers=exc.headers or None)


def domain_exception(request: Request[Any, Any, Any], exc: LmsError) -> Response[dict[str, Any]]:
    if isinstance(exc, Unauthenticated):
        return error_response(request, 401, str(exc), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, Forbidden):
        return error_response(request, 403, str(exc))
    if isinstance(exc, RateLimited):
        return error_response(request, 429, str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, NotFound):
        return error_response(request, 404, str(exc))
    if isinstance(exc, AlreadyExists | Conflict):
        return error_response(request, 409, str(exc))
    if isinstance(exc, InvalidInput):
        return error_response(request, 422, str(exc))
    if isinstance(exc, CommandNotSent):
        log.error("command %d not confirmed by the broker: %s", exc.command_id, exc)
        return error_response(request, 503, str(exc), details={"command_id": exc.command_id},
                              headers={"Location": exc.location})
    if isinstance(exc, StorageError | BrokerError):
        log.error("dependency failed: %s", exc)
        return error_response(request, 503, "a backing service is unavailable; try again")
    log.error("unhandled domain error: %s", exc)
    return error_response(request, HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


def data_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """A value PostgreSQL cannot take (out of range, bad encoding) is the caller's error.

    The driver's text stays in our log: it names tables, types and the driver, which tell a
    caller nothing useful and an attacker something."""
    log.warning("refused a value the database cannot hold on %s: %s: %s", request.url.path,
                exc.__class__.__name__, exc)
    return error_response(request, 422, "a value is out of range or cannot be stored")


def constraint_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """A database rule the route did not check first (a bug worth a log line, but the
    caller's input): a duplicate is a 409, anything else a 422, in our words."""
    log.warning("a database constraint refused input on %s: %s: %s", request.url.path,
                exc.__class__.__name__, exc)
    if isinstance(exc, asyncpg.UniqueViolationError):
        return error_response(request, 409, "this already exists")
    return error_response(request, 422, "a value is not allowed here")


def connection_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """PostgreSQL not there (refused, lost, shutting down): 503 like any dependency that
    failed, not 500; anything else that lands here is a bug."""
    if is_connection_error(exc):
        return domain_exception(request, translate(exc))
    return unexpected_exception(request, exc)


def unexpected_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


HANDLERS: dict[Any, Any] = {
    HTTPException: http_exception,
    asyncpg.DataError: data_exception,
    asyncpg.IntegrityConstraintViolationError: constraint_exception,
    OverflowError: data_exception,
    LmsError: domain_exception,
    # The driver's connection errors, wherever a service did not translate them itself.
    OSError: connection_exception,
    asyncpg.InterfaceError: connection_exception,
    asyncpg.PostgresConnectionError: connection_exception,
    asyncpg.exceptions.OperatorInterventionError: connection_exception,
    Exception: unexpected_exception,
}
