# -*- test-case-name: tests.test_ops -*-
"""
The access log: one structured C{twisted.logger} event per request.

It replaces Twisted's combined log line.  The event carries the fields as
data (C{client}, C{user}, C{method}, C{path}, C{status}, C{bytes},
C{duration}, C{agent}), so the JSON log keeps them apart; the text log shows
them in one line.  Credentials never get in: no header is logged except the
User-Agent, user information in a URL is removed, and query parameters whose
names suggest a secret lose their values (L{devpi_twisted.model.redact}).
"""

from typing import Any

from twisted.logger import Logger

from devpi_twisted.model.redact import scrubRequestURI, scrubText
from devpi_twisted.web.context import _REQUESTER
from devpi_twisted.web.server import DevpiRequest

ACCESS_NAMESPACE = "devpi_twisted.access"
ABORTED = 499  # nginx's "client closed request": the connection was lost before the answer was complete


class AccessLog:
    """A request observer (see L{devpi_twisted.web.server.DevpiSite}) that logs each request."""

    def __init__(self, logger: Logger | None = None) -> None:
        self.log = logger or Logger(namespace=ACCESS_NAMESPACE)

    def requestDone(self, request: DevpiRequest) -> None:
        address: Any = request.getClientAddress()
        client = getattr(address, "host", None) or "-"
        user = getattr(request, _REQUESTER, None) or "-"
        method = request.method.decode("ascii", "replace")[:16] if isinstance(request.method, bytes) else "-"
        uri = request.uri if isinstance(request.uri, bytes) else b"-"
        if b"?" in uri or b"@" in uri or b"\\" in uri:
            path = scrubRequestURI(uri)[:2048]
        else:
            path = uri[:2048].decode("utf-8", "backslashreplace")
        agents = request.requestHeaders.getRawHeaders(b"User-Agent")
        agent = scrubText(agents[0].decode("utf-8", "replace"))[:256] if agents else "-"
        status = ABORTED if request.aborted else request.code
        size = request.sentLength
        duration = request.duration
        # The line is formatted here, once, and logged as one field: formatting the
        # fields through the log system would cost more than the request itself.
        self.log.info(
            "{line}",
            line=f'{client} {user} "{method} {path}" {status} {size} {duration:.3f}s "{agent}"',
            client=client, user=user, method=method, path=path, status=status, aborted=request.aborted,
            bytes=size, duration=duration, agent=agent, secure=request.isSecure(),
        )
