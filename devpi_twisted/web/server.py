# -*- test-case-name: tests.test_ops,tests.test_slowclients -*-
"""
The HTTP server around the routes: limits, security headers, request
accounting and a graceful drain.

L{DevpiSite} is a L{twisted.web.server.Site} that
  - bounds the request head (C{maxHeaderSize}, C{maxHeaders}) and the time a
    client may take to send it (C{headerTimeout}, L{devpi_twisted.web.channel}); the idle
    timeout of keep-alive connections is Twisted's own C{timeOut};
  - bounds how slowly a body may come (C{bodyTimeout}, C{minBodyRate}): each
    C{bodyTimeout} seconds of a body must bring at least C{minBodyRate}
    bytes a second, else the client gets 408 and the connection closes.  A
    small body must so arrive within C{bodyTimeout}; a multi-gigabyte upload
    on any working link goes on as long as it keeps coming; a body dripped a
    byte at a time holds its connection for C{bodyTimeout} at most; a period
    in which the server itself stopped reading (an upload waiting for its
    disk writes) does not count;
  - keeps C{maxConnections} slots, and when they are all taken gives a new
    connection the slot of the connection that has waited longest for its
    client: idle between requests, or still sending a request head or body
    (the slow client, answered 503 and closed).  Connections whose request
    is being answered, and uploads whose credentials and permission were
    checked from their head (the body gate, below), are never given up; only
    when every slot is such a connection is the new one answered 503.  So
    clients that have not authenticated can take every free slot, but never
    keep a new client out: a normal request, sent at once, is answered while
    any number of slow clients hold connections;
  - asks a body gate (L{devpi_twisted.web.upload.UploadGate}), once a
    request's head has arrived, whether its body may come in: a large upload
    from a client that may not upload is answered 401/403 at once, with the
    transport paused while the credentials are checked, so nothing of the
    body is spooled;
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
from twisted.web.resource import Resource
from twisted.web.server import Site

from devpi_twisted.web.channel import BodyGate, DevpiChannel
from devpi_twisted.web.headers import headProblem
from devpi_twisted.web.limits import LimitedRequest
from devpi_twisted.web.responses import jsonBody, rawAnswer

log = Logger()

# Our HTML (simple pages) has no scripts, styles or images.
HTML_CSP = b"default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
# Uploaded documentation is somebody's HTML: it may style itself, run its own
# scripts and submit its own forms (a Sphinx search box), but in a sandbox, so
# it can never act with this origin.  The one documentation policy: docs
# members carry it (web/docs.py), and any other HTML under +doc/ gets it here.
DOC_CSP = b"sandbox allow-scripts allow-popups allow-forms; default-src 'self' 'unsafe-inline' data:"
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
    @ivar maxConnections: open connections at once; past it a new connection
        takes the slot of the one that waited longest for its client, or is
        answered 503 and closed when none is waiting.
    @ivar bodyTimeout: seconds a request body gets; see C{minBodyRate}.
    @ivar minBodyRate: bytes a second a body must keep coming at, measured
        over each C{bodyTimeout} seconds, to get another C{bodyTimeout}.
    @ivar trustedProxies: addresses of reverse proxies whose
        C{X-Forwarded-For} names the real client.
    """

    idleTimeout: float | None = 60.0
    headerTimeout: float | None = 30.0
    maxHeaderSize: int = 16384
    maxHeaders: int = 100
    maxConnections: int = 500
    bodyTimeout: float | None = 60.0
    minBodyRate: int = 8192
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
            self.code = self._refusedCode
        if self._site is not None:
            self.duration = max(0.0, self._site.reactor.seconds() - self.startedAt)
            self._site._requestDone(self)


class _Refused(Protocol):
    """Answers 503 at once and closes: the server is full or shutting down."""

    def __init__(self, site: "DevpiSite", message: str) -> None:
        self._site = site
        self._message = message
        self._abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(rawAnswer(503, self._message, [(b"Retry-After", b"5")],
                                       reason=b"Service Unavailable"))
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
    @param bodyGate: asked whether a request's body may come in, once its
        head has arrived (see L{BodyGate}).
    """

    protocol = DevpiChannel  # HTTP/1.1 only: no HTTP/2 negotiation wrapper
    displayTracebacks = False

    def __init__(self, resource: Resource, reactor: Any, limits: SiteLimits = SiteLimits(),
                 requestFactory: type[DevpiRequest] = DevpiRequest,
                 observers: Iterable[RequestObserver] = (), bodyGate: BodyGate | None = None) -> None:
        super().__init__(resource, requestFactory=requestFactory, reactor=reactor,
                         timeout=limits.idleTimeout, parsePOSTFormSubmission=False)
        self.limits = limits
        self.observers = list(observers)
        self.channels: set[DevpiChannel] = set()
        self.active: set[DevpiRequest] = set()
        self.bodyGate = bodyGate
        self.refusedConnections = 0
        self.evictedConnections = 0
        # Channels waiting for their client (idle, or sending a head or
        # body), longest waiting first: the ones given up when all are taken.
        self._waiting: dict[DevpiChannel, None] = {}
        self._lastEvictionLog = -1e9
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
        if not self.draining and len(self.channels) >= self.limits.maxConnections and self._waiting:
            self._evict(next(iter(self._waiting)))
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
        channel.bodyTimeout = self.limits.bodyTimeout
        channel.minBodyRate = self.limits.minBodyRate
        self.channels.add(channel)
        self._waitingOn(channel)
        return channel

    def _evict(self, channel: DevpiChannel) -> None:
        """Free the slot of C{channel} at once; it closes as soon as its answer is out."""
        self._waiting.pop(channel, None)
        self.channels.discard(channel)
        self.evictedConnections += 1
        now = self.reactor.seconds()
        if now - self._lastEvictionLog >= 10:
            self._lastEvictionLog = now
            log.warn(
                "all {limit} connections taken (--max-connections): closing the ones that waited longest "
                "for their client to make room ({evicted} so far)",
                limit=self.limits.maxConnections, evicted=self.evictedConnections,
            )
        if channel.transport is not None:
            channel.evict()

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

    def _waitingOn(self, channel: DevpiChannel) -> None:
        self._waiting.pop(channel, None)
        if channel in self.channels:
            self._waiting[channel] = None

    def _notWaiting(self, channel: DevpiChannel) -> None:
        self._waiting.pop(channel, None)

    def _channelClosed(self, channel: DevpiChannel) -> None:
        self._waiting.pop(channel, None)
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
