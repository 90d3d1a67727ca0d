"""
The one place that maps errors to HTTP.

Domain errors carry their status; routing misses from Werkzeug carry theirs;
a full disk is 507 (logged in one line: the operator must free space);
storage that cannot be reached is 503 with C{Retry-After} (logged in one
warning line, at most every L{OUTAGE_LOG_INTERVAL} seconds, with how many
requests it refused meanwhile: an outage must not flood the log);
anything else is a bug: logged with its traceback, answered with a plain 500
and no traceback.  Every error body is JSON C{{"message": ...}}.
"""

import time
from typing import Any, Callable

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from devpi_twisted.errors import DevpiError, InsufficientStorage, StorageUnavailable, TooManyRequests, Unauthorized, diskFullError
from devpi_twisted.web.responses import jsonBody

log = Logger()

OUTAGE_LOG_INTERVAL = 10.0


class OutageLog:
    """
    Logs refusals for unreachable storage as one warning line, then at most
    one every C{interval} seconds that counts those left out.  A storage
    outage is the operator's to fix, not a bug: no traceback.
    """

    def __init__(self, interval: float = OUTAGE_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._quiet = 0

    def refused(self, request: IRequest, error: StorageUnavailable) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._quiet += 1
            return
        quiet, self._quiet, self._last = self._quiet, 0, now
        log.warn(
            "storage unavailable: {method} {path} answered 503 ({error}){more}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            error=error.message, refusedBefore=quiet,
            more=f"; {quiet} more refused since the last such line" if quiet else "",
        )


outageLog = OutageLog()


def _reason(message: str) -> bytes:
    """A message usable as an HTTP reason phrase: one line of ASCII."""
    text = " ".join(message.split())
    return text.encode("ascii", "replace")[:200]


def renderDevpiError(request: IRequest, failure: Failure) -> bytes:
    error = failure.value
    assert isinstance(error, DevpiError)
    if isinstance(error, InsufficientStorage):
        _logDiskFull(request, failure)
    if isinstance(error, StorageUnavailable):
        outageLog.refused(request, error)
    body = jsonBody(request, error.status, message=error.message)
    if getattr(error, "reasonPhrase", False):
        # twine and setuptools show the reason phrase, not the body.
        request.setResponseCode(error.status, _reason(error.message))
    if isinstance(error, Unauthorized) and getattr(error, "challenge", False):
        request.setHeader(b"WWW-Authenticate", b'Basic realm="pypi"')
    if isinstance(error, TooManyRequests):
        request.setResponseCode(429, b"Too Many Requests")
    if isinstance(error, (TooManyRequests, StorageUnavailable)):
        request.setHeader(b"Retry-After", str(error.retryAfter).encode("ascii"))
    return body


def renderHTTPException(request: IRequest, failure: Failure) -> bytes:
    error = failure.value
    assert isinstance(error, HTTPException)
    code = error.code or 500
    if code in (301, 302, 307, 308) and getattr(error, "new_url", None):
        request.setResponseCode(code)
        request.setHeader(b"Location", error.new_url.encode("utf-8"))
        return b""
    messages = {404: "Not Found", 405: "Method Not Allowed"}
    return jsonBody(request, code, message=messages.get(code, error.name))


def _logDiskFull(request: IRequest, failure: Failure) -> None:
    cause = failure.value.__cause__ or failure.value
    log.error(
        "disk full: {method} {path} stored nothing ({cause})",
        method=request.method.decode("ascii", "replace"),
        path=request.path.decode("ascii", "replace"),
        cause=str(cause),
    )


def renderUnexpected(request: IRequest, failure: Failure) -> bytes:
    diskFull = diskFullError(failure.value)
    if diskFull is not None:
        # An OSError from a file write (blobs, docs), maybe among gathered ones.
        return renderDevpiError(request, Failure(diskFull))
    log.failure(
        "unexpected error for {method} {path}",
        failure=failure,
        method=request.method.decode("ascii", "replace"),
        path=request.path.decode("ascii", "replace"),
    )
    return jsonBody(request, 500, message="internal server error")


HANDLERS: list[tuple[Any, Any]] = [
    (HTTPException, renderHTTPException),
    (DevpiError, renderDevpiError),
    (Exception, renderUnexpected),
]
"""In the order Klein must try them: Werkzeug's first, the catch-all last."""
