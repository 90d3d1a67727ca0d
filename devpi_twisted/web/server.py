# -*- test-case-name: tests.test_ops -*-
"""
The HTTP server around the routes: limits, security headers, request
accounting and a graceful drain.

L{DevpiSite} is a L{twisted.web.server.Site} that
  - refuses connections beyond C{maxConnections} with a 503;
  - bounds the request head (C{maxHeaderSize}, C{maxHeaders}) and the time a
    client may take to send it (C{headerTimeout}, L{DevpiChannel}); the idle
    timeout of keep-alive connections is Twisted's own C{timeOut};
  - keeps track of open connections and requests, so a shutdown can stop
    accepting, let the requests in flight finish within a grace period
    (L{DevpiSite.drain}), and only then stop the storage;
  - replaces Twisted's combined access log with observers that are told of
    every finished or abandoned request (the structured access log in
    L{devpi_twisted.web.accesslog}, the counters in
    L{devpi_twisted.web.metrics}).

L{DevpiRequest} adds C{X-Content-Type-Options: nosniff} to every answer, a
Content-Security-Policy to HTML answers and, on TLS connections, HSTS.
"""

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol as TypingProtocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from .headers import headProblem
from .limits import LimitedRequest
from .responses import jsonBody, rawAnswer

log = Logger()

# Our HTML (simple pages) has no scripts, styles or images.
HTML_CSP = b"default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
# Uploaded documentation is somebody's HTML: it may style itself and run its
# own scripts, but in a sandbox, so it can never act with this origin.
DOC_CSP = (
    b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    b"script-src 'self' 'unsafe-inline'; font-src 'self' data:; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'self'; sandbox allow-scripts allow-popups allow-popups-to-escape-sandbox"
)
HSTS = b"max-age=31536000"
NOSNIFF = b"nosniff"


@dataclass(frozen=True)
class SiteLimits:
    """
    What one client may take of the server.

    @ivar idleTimeout: seconds a connection may send nothing while no request
        is being answered (Twisted's C{Site(timeout=...)}).
    @ivar headerTimeout: seconds from the first byte of a request until its
        last header line; a client that drips its head is cut off with 408.
    @ivar maxHeaderSize: bytes of request line plus headers; more is a 400.
    @ivar maxHeaders: number of header lines; more is a 400.
    @ivar maxConnections: open connections at once; more are answered 503
        and closed.
    @ivar trustedProxies: addresses of reverse proxies whose
        C{X-Forwarded-For} names the real client.
    """

    idleTimeout: float | None = 60.0
    headerTimeout: float | None = 30.0
    maxHeaderSize: int = 16384
    maxHeaders: int = 100
    maxConnections: int = 500
    trustedProxies: frozenset[str] = field(default_factory=frozenset)


class RequestObserver(TypingProtocol):
    """Told once about every request, when it is answered or abandoned."""

    def requestDone(self, request: "DevpiRequest") -> None: ...


class DevpiRequest(LimitedRequest):
    """
    A request that reports to its site when it starts and ends, and adds the
    security headers before the first byte of the answer goes out.

    @ivar startedAt: when the request line arrived (the site's clock).
    @ivar duration: seconds from then until the answer was finished or the
        connection lost.
    @ivar aborted: the connection was lost before the answer was finished.
    """

    startedAt = 0.0
    duration = 0.0
    aborted = False
    _completed = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self._site: DevpiSite | None = getattr(channel, "site", None)
        if self._site is not None:
            self.startedAt = self._site.reactor.seconds()
            self._site._requestStarted(self)

    # the answer

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._site is not None and self._site.draining and not self._refused:
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self.channel.persistent = False
        super().requestReceived(command, path, version)

    def process(self) -> None:
        problem = headProblem(self)
        if problem is None:
            super().process()
        else:
            self._answerMalformed(*problem)

    def _answerMalformed(self, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        """Answer a request whose method or Host no resource should see."""
        self.site = self.channel.site
        for name, value in headers:
            self.setHeader(name, value)
        self.write(jsonBody(self, status, message=message))
        self.finish()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._securityHeaders()
        super().write(data)

    def _securityHeaders(self) -> None:
        headers = self.responseHeaders
        headers.setRawHeaders(b"X-Content-Type-Options", [NOSNIFF])
        if self.isSecure():
            headers.setRawHeaders(b"Strict-Transport-Security", [HSTS])
        contentType = headers.getRawHeaders(b"Content-Type")
        # Without a Content-Type, Twisted sends its default, text/html.
        if (contentType is None or contentType[0].lower().startswith(b"text/html")) \
                and not headers.hasHeader(b"Content-Security-Policy"):
            path = self.path or b""
            isDoc = b"/+doc/" in path or path.endswith(b"/+doc")
            headers.setRawHeaders(b"Content-Security-Policy", [DOC_CSP if isDoc else HTML_CSP])

    def getClientAddress(self) -> IAddress:
        """The peer, or behind a trusted reverse proxy the client it names."""
        peer = super().getClientAddress()
        site = self._site
        if site is None or not site.limits.trustedProxies:
            return peer
        if getattr(peer, "host", None) not in site.limits.trustedProxies:
            return peer
        forwarded = self.requestHeaders.getRawHeaders(b"X-Forwarded-For")
        if not forwarded:
            return peer
        # The proxy appends the address it saw: the last one not a proxy is the client.
        hops = [h.strip().decode("ascii", "replace") for h in b",".join(forwarded).split(b",") if h.strip()]
        for hop in reversed(hops):
            if hop not in site.limits.trustedProxies:
                return (IPv6Address if ":" in hop else IPv4Address)("TCP", hop, 0)
        return peer

    # the end

    def finish(self) -> None:
        super().finish()
        self._complete(aborted=False)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._complete(aborted=not self._refused)

    def _complete(self, aborted: bool) -> None:
        if self._completed:
            return
        self._completed = True
        self.aborted = aborted
        if self._refused:
            self.code = 413
        if self._site is not None:
            self.duration = max(0.0, self._site.reactor.seconds() - self.startedAt)
            self._site._requestDone(self)


class DevpiChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with a deadline for the request head.

    Twisted's idle timeout is reset by every byte, so a client that sends its
    headers one byte at a time could hold a connection forever; this channel
    gives each request head C{headerTimeout} seconds from its first byte.
    (It looks at C{line_mode}: an C{HTTPChannel} is in line mode exactly
    while it reads a request line and headers.)  One timer per connection
    checks the head in progress, instead of a timer per request.
    """

    headerTimeout: float | None = None
    site: "DevpiSite"
    _headerCall: IDelayedCall | None = None
    _headStarted: float | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._headStarted is None and self.headerTimeout and self.line_mode:
            self._headStarted = self.site.reactor.seconds()
            if self._headerCall is None:
                self._headerCall = self.callLater(self.headerTimeout, self._checkHead)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._headStarted = None
        request = self.requests[-1]
        # Known before the body arrives, so a request refused or abandoned
        # while its body comes in is still logged with what it was.
        request.method = getattr(self, "_command", request.method)
        uri = getattr(self, "_path", None)
        if uri is not None:
            request.uri = uri
            request.path = uri.split(b"?", 1)[0]
        super().allHeadersReceived()

    def _checkHead(self) -> None:
        self._headerCall = None
        if self._headStarted is None or self.headerTimeout is None:
            return
        left = self._headStarted + self.headerTimeout - self.site.reactor.seconds()
        if left > 1e-6:
            self._headerCall = self.callLater(left, self._checkHead)
            return
        log.info(
            "closing the connection from {peer}: no complete request head within {timeout}s",
            peer=str(self.transport.getPeer()), timeout=self.headerTimeout,
        )
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.timeoutConnection()

    # A malformed head: Twisted's answer is a bare 400 (and for a line over
    # its fixed limit of 16384 bytes, none at all); ours says what is wrong.

    @property  # type: ignore[override]
    def MAX_LENGTH(self) -> int:
        """One request or header line may be as long as the whole head may be."""
        return self.totalHeadersSize

    def lineLengthExceeded(self, line: bytes) -> None:
        self._badHead(f"a request or header line is longer than the limit of {self.totalHeadersSize} bytes "
                      f"(--max-header-size)")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if getattr(self, "_receivedHeaderSize", 0) > self.totalHeadersSize:
            message = f"the request head is larger than the limit of {self.totalHeadersSize} bytes (--max-header-size)"
        elif getattr(self, "_receivedHeaderCount", 0) > self.maxHeaders:
            message = f"the request has more than {self.maxHeaders} header lines"
        else:
            message = "malformed request: its request line, a header or its chunked body is not valid HTTP/1.1"
        self._badHead(message)

    def _badHead(self, message: str) -> None:
        self.transport.write(rawAnswer(400, b"Bad Request", message))
        self.loseConnection()

    _secure: bool | None = None

    def isSecure(self) -> bool:
        # Asked for every answer (HSTS); the transport does not change.
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def connectionLost(self, reason: Failure) -> None:
        if self._headerCall is not None and self._headerCall.active():
            self._headerCall.cancel()
        self._headerCall = None
        try:
            super().connectionLost(reason)
        finally:
            self.site._channelClosed(self)


class _Refused(Protocol):
    """Answers 503 at once and closes: the server is full or shutting down."""

    def __init__(self, site: "DevpiSite", message: str) -> None:
        self._site = site
        self._message = message
        self._abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        body = b'{"message": "' + self._message.encode("ascii") + b'"}\n'
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\n"
            b"Content-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.transport.loseConnection()
        self._abort = self._site.reactor.callLater(10, self.transport.abortConnection)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._abort is not None and self._abort.active():
            self._abort.cancel()


class DevpiSite(Site):
    """
    The site: routes, limits, request observers and draining.

    @param resource: the root resource.
    @param reactor: the reactor (or a clock in tests) for timeouts and times.
    @param limits: what a client may take.
    @param requestFactory: a L{DevpiRequest} subclass (e.g. with its body limit).
    @param observers: told of each request when it ends.
    """

    protocol = DevpiChannel  # HTTP/1.1 only: no HTTP/2 negotiation wrapper
    displayTracebacks = False

    def __init__(self, resource: Resource, reactor: Any, limits: SiteLimits = SiteLimits(),
                 requestFactory: type[DevpiRequest] = DevpiRequest,
                 observers: Iterable[RequestObserver] = ()) -> None:
        super().__init__(resource, requestFactory=requestFactory, reactor=reactor,
                         timeout=limits.idleTimeout, parsePOSTFormSubmission=False)
        self.limits = limits
        self.observers = list(observers)
        self.channels: set[DevpiChannel] = set()
        self.active: set[DevpiRequest] = set()
        self.refusedConnections = 0
        self.draining = False
        self._drained: list[Deferred[None]] = []
        self._lastRefusalLog = -1e9

    # Twisted's combined log and its once-a-second date timer are replaced by
    # the observers.
    def startFactory(self) -> None:
        pass

    def stopFactory(self) -> None:
        pass

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        if self.draining or len(self.channels) >= self.limits.maxConnections:
            self.refusedConnections += 1
            now = self.reactor.seconds()
            if now - self._lastRefusalLog >= 10:
                self._lastRefusalLog = now
                log.warn(
                    "refusing connections: {reason} ({open} open, limit {limit}, --max-connections)",
                    reason="shutting down" if self.draining else "too many connections",
                    open=len(self.channels), limit=self.limits.maxConnections,
                )
            message = "the server is shutting down" if self.draining else "too many connections, try again"
            refused = _Refused(self, message)
            refused.factory = self
            return refused
        channel = super().buildProtocol(addr)
        channel.totalHeadersSize = self.limits.maxHeaderSize
        channel.maxHeaders = self.limits.maxHeaders
        channel.headerTimeout = self.limits.headerTimeout
        self.channels.add(channel)
        return channel

    # bookkeeping, called by requests and channels

    def _requestStarted(self, request: DevpiRequest) -> None:
        self.active.add(request)

    def _requestDone(self, request: DevpiRequest) -> None:
        self.active.discard(request)
        for observer in self.observers:
            try:
                observer.requestDone(request)
            except Exception:
                log.failure("request observer {observer} failed", observer=observer)

    def _channelClosed(self, channel: DevpiChannel) -> None:
        self.channels.discard(channel)
        if self.draining and not self.channels:
            self._fireDrained()

    # shutting down

    def drain(self, grace: float) -> Deferred[None]:
        """
        Close idle connections, let the requests in flight finish (their
        connections close once the answer is sent), and fire when no
        connection is left, or after C{grace} seconds, when the rest are cut
        off.  It waits for connections, not requests: a finished answer may
        still sit in the transport's buffer until a slow client reads it.
        """
        self.draining = True
        for channel in list(self.channels):
            if not channel.requests:
                channel.loseConnection()
                continue
            channel.persistent = False
            for request in channel.requests:
                if not request.startedWriting:
                    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        if not self.channels:
            return succeed(None)
        log.info("waiting up to {grace}s for {count} requests in flight and {connections} connections to close",
                 grace=grace, count=len(self.active), connections=len(self.channels))
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        timer = self.reactor.callLater(grace, self._graceOver, grace)

        def cancelTimer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(cancelTimer)

    def _graceOver(self, grace: float) -> None:
        log.warn(
            "{count} requests still open after the shutdown grace period of {grace}s (--shutdown-grace); "
            "closing their connections", count=len(self.active), grace=grace,
        )
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()
        self._fireDrained()

    def _fireDrained(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)
