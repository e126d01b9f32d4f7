"""The PostgreSQL pool and the mapping of asyncpg's errors to the core's own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from lms_core.errors import DatabaseUnavailable, StorageError

#: Errors that mean "the database is not there right now"; anything else is a bug or bad data.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    # SQLSTATE class 08 (connection exception) and 57P (operator intervention).
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith(("08", "57P"))


def is_transient(exc: BaseException) -> bool:
    """Worth retrying as is: the connection failed, or the transaction lost a race
    (SQLSTATE class 40: deadlock, serialization failure)."""
    return is_connection_error(exc) or (getattr(exc, "sqlstate", None) or "").startswith("40")


#: SQLSTATE classes that say "not now" rather than "not this data": connection exception
#: (08), transaction rollback (40: deadlock, serialization), insufficient resources (53),
#: operator intervention (57: shutdown, cancel), system error (58: I/O) and internal error (XX).
_UNAVAILABLE_CLASSES = ("08", "40", "53", "57", "58", "XX")


def translate(exc: BaseException) -> StorageError:
    """The driver's and the socket's errors in the core's terms. This is the one place that
    knows asyncpg's types: a storage layer catches ``Exception`` at its boundary and raises
    what this returns, so callers decide on :class:`DatabaseUnavailable` alone.

    Anything that is not about the data - a lost or refused connection, a time-out, a
    driver-internal failure (asyncpg raised ``InternalClientError`` at COMMIT during an
    outage), a race lost to another transaction - is ``DatabaseUnavailable``: the same
    work may succeed when tried again. The rest (bad SQL, a constraint the data breaks) is
    a plain ``StorageError``.
    """
    if isinstance(exc, StorageError):
        return exc
    what = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith(_UNAVAILABLE_CLASSES) or isinstance(exc, CONNECTION_ERRORS):
            return DatabaseUnavailable(what)
        return StorageError(what)
    if isinstance(exc, (*CONNECTION_ERRORS, asyncpg.exceptions.InternalClientError)):
        return DatabaseUnavailable(what)
    return StorageError(what)


def _describe(url: str) -> str:
    return url.split("@")[-1] if "@" in url else url


async def connect(url: str, *, timeout: float = 10) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=timeout)
    except Exception as exc:
        if is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError):
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {_describe(url)}: {exc}") from None
        raise


@contextlib.asynccontextmanager
async def create_pool(url: str, *, min_size: int = 1, max_size: int = 5,
                      server_settings: dict[str, str] | None = None) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool, opened and closed as a context manager; ``server_settings`` are set
    on each of its sessions (e.g. timeouts PostgreSQL enforces itself)."""
    try:
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, timeout=10,
                                         command_timeout=60, server_settings=server_settings)
    except Exception as exc:
        if is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError):
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {_describe(url)}: {exc}") from None
        raise
    try:
        yield pool
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 10)
