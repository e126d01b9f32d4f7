"""Domain errors of the API's services, beside the shared core's (``lms_core.errors``).
``api.errors`` maps each to an HTTP status; nothing else does.

    LmsError
    ├── Unauthenticated        no valid credentials                      -> 401
    │   └── InvalidCredentials     wrong email or password at login
    ├── Forbidden              the caller may not do this                -> 403
    │   ├── WrongPassword          the current password, when changing it
    │   └── RegistrationClosed     self-service sign-up is turned off
    ├── RateLimited            too many attempts; ``retry_after`` seconds -> 429
    │   └── TooManyAttempts        logins, sign-ups
    ├── Conflict               the resource's state does not allow it    -> 409
    │                          (e.g. cancelling a command that has finished)
    └── CommandNotSent         the broker did not (or did not say it) took a stored command
                               -> 503 naming the command and where to look it up
"""

from __future__ import annotations

from lms_core.errors import LmsError


class Unauthenticated(LmsError):
    pass


class InvalidCredentials(Unauthenticated):
    pass


class Forbidden(LmsError):
    pass


class WrongPassword(Forbidden):
    pass


class RegistrationClosed(Forbidden):
    pass


class RateLimited(LmsError):
    def __init__(self, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyAttempts(RateLimited):
    def __init__(self, retry_after: int, message: str = "too many failed logins; try again later") -> None:
        super().__init__(retry_after, message)


class Conflict(LmsError):
    pass


class CommandNotSent(LmsError):
    """A command was stored but the broker refused it (``failed``) or did not acknowledge it
    (still ``pending``: it may yet reach the device). The answer names the command, so that
    a caller looks it up before sending it again rather than running it twice."""

    def __init__(self, message: str, command_id: int, location: str) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.location = location
