"""
Domain exceptions.

Domain code raises these; L{devpi_twisted.web.errors} is the one place that
turns them into HTTP answers.  Each carries the HTTP status it stands for so
the mapping stays a table, not a chain of special cases.
"""

import errno


class DevpiError(Exception):
    """Base of every error that has a meaning for a client."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(DevpiError):
    """The request's body, name or parameters are not acceptable."""

    status = 400


class Unauthorized(DevpiError):
    """No valid credentials where credentials are needed."""

    status = 401


class Forbidden(DevpiError):
    """The authenticated (or anonymous) user may not do this."""

    status = 403


class NotFound(DevpiError):
    """The user, index, project or file does not exist."""

    status = 404


class Gone(DevpiError):
    """It existed, and was deleted."""

    status = 410


class Conflict(DevpiError):
    """The name is taken, or other content exists under that name."""

    status = 409


class NotAcceptable(DevpiError):
    """Nothing the client accepts can be produced."""

    status = 406


class UnsupportedMediaType(DevpiError):
    """The view needs a media type the client did not ask for."""

    status = 415


class TooLarge(DevpiError):
    """The request body is larger than the configured limit."""

    status = 413


class TooManyRequests(DevpiError):
    """Too many attempts (failed logins); C{retryAfter} says when to try again."""

    status = 429

    def __init__(self, message: str, retryAfter: int = 1) -> None:
        super().__init__(message)
        self.retryAfter = retryAfter


class InsufficientStorage(DevpiError):
    """
    The disk (or the user's quota) is full: nothing of the request was kept,
    and the same request succeeds once space is freed, without a restart.
    """

    status = 507
    reasonPhrase = True  # twine shows the reason phrase, not the body

    def __init__(self, message: str = "the server's disk is full; nothing was stored") -> None:
        super().__init__(message)


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def diskFullError(error: BaseException) -> InsufficientStorage | None:
    """
    The L{InsufficientStorage} that C{error} stands for, if it comes from a
    full disk: an C{OSError} of C{ENOSPC} or C{EDQUOT}, also when it is the
    cause of another error or one of several gathered ones
    (L{twisted.internet.defer.FirstError}).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, InsufficientStorage):
            return current
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            found = InsufficientStorage()
            found.__cause__ = current
            return found
        subFailure = getattr(current, "subFailure", None)  # FirstError
        todo += [current.__cause__, current.__context__, getattr(subFailure, "value", None)]
    return None


class StorageUnavailable(DevpiError):
    """
    The database or the object store cannot be reached just now: the
    request changed nothing and may be repeated once it is back (the
    backend reconnects by itself).  C{retryAfter} says when to try again.
    """

    status = 503

    def __init__(self, message: str = "the server's storage is unreachable just now; try again shortly",
                 retryAfter: int = 2) -> None:
        super().__init__(message)
        self.retryAfter = retryAfter


class UpstreamError(DevpiError):
    """An upstream index failed and nothing cached can stand in."""

    status = 502


class StorageError(Exception):
    """The storage backend cannot be used (wrong format, locked, corrupt)."""


class ServerDirError(StorageError):
    """The server directory is unusable as it is; the message says what to do."""
