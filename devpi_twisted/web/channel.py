# -*- test-case-name: tests.test_slowclients,tests.test_ops -*-
"""
One client connection of L{devpi_twisted.web.server.DevpiSite}: what a
client may take of it, enforced on the reactor before any resource runs.

L{DevpiChannel} gives each request head C{headerTimeout} seconds and each
body C{bodyTimeout} seconds at C{minBodyRate} bytes a second (the details
are in L{devpi_twisted.web.server}); asks the site's body gate whether a
request's body may come in, and lingers to read and drop a refused body so
the client sees the answer; and tells its site when it waits for its client,
so a full site can give its slot to a new connection (L{DevpiChannel.evict}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from devpi_twisted.errors import DevpiError, StorageUnavailable, TooManyRequests, Unauthorized
from devpi_twisted.web.responses import rawAnswer

if TYPE_CHECKING:
    from devpi_twisted.web.server import DevpiRequest, DevpiSite

log = Logger()

# Seconds the rest of a refused upload body is read and dropped, so that the
# client sees the answer instead of a reset connection.
LINGER = 5.0
EVICTED = "the server is full: this connection waited longest for its client; try again"

BodyGate = Callable[["DevpiRequest", int | None], "Deferred[None] | None"]
"""
Asked when a request head has arrived, with the body's length (C{None}:
chunked): C{None} to take the body, or a Deferred that fires to take it or
fails with a L{DevpiError} to answer that instead.
"""


class DevpiChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with deadlines for the request head and body, a
    body gate, and a slot its site may give to a newer connection.

    Twisted's idle timeout is reset by every byte, so a client that sends its
    headers one byte at a time could hold a connection forever; this channel
    gives each request head C{headerTimeout} seconds from its first byte.
    (It looks at C{line_mode}: an C{HTTPChannel} is in line mode exactly
    while it reads a request line and headers.)  One timer per connection
    checks the head in progress, instead of a timer per request.
    """

    headerTimeout: float | None = None
    bodyTimeout: float | None = None
    minBodyRate = 0
    site: "DevpiSite"
    _headerCall: IDelayedCall | None = None
    _headStarted: float | None = None
    _bodyCall: IDelayedCall | None = None
    _bodyBytes = 0
    _gateBuffer: list[bytes] | None = None
    _discardLeft: int | None = None
    _discarding = False
    _lingerCall: IDelayedCall | None = None
    _gone = False

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            self._discard(len(data))
            return
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
        gate = self.site.bodyGate
        check = gate(request, self.length) if gate is not None and self.length != 0 else None
        if check is None:
            self._takeBody()
            return
        # Decide before reading any of the body: what already arrived waits
        # in _gateBuffer, the rest in the client's socket.
        self._gateBuffer = []
        self._networkProducer.pauseProducing()
        check.addCallbacks(lambda _: self._gatePassed(), self._gateRefused)

    def _takeBody(self) -> None:
        """Let the body in (Twisted's C{gotLength}, 100-continue) and start its deadline."""
        super().allHeadersReceived()
        if self.bodyTimeout and self.length != 0 and not self._gone:
            self._bodyBytes = 0
            self._bodyCall = self.callLater(self.bodyTimeout, self._checkBody)

    def _gatePassed(self) -> None:
        if self._gone or self._gateBuffer is None:
            return
        buffered, self._gateBuffer = b"".join(self._gateBuffer), None
        self.site._notWaiting(self)  # an upload its head shows allowed is not given up for others
        self._takeBody()
        self._networkProducer.resumeProducing()
        if buffered:
            self.rawDataReceived(buffered)

    def _gateRefused(self, failure: Failure) -> None:
        if self._gone or self._gateBuffer is None:
            return
        if not failure.check(DevpiError):
            log.failure("checking an upload before its body failed; the body is taken",
                        failure=failure)
            self._gatePassed()
            return
        error: Any = failure.value
        headers: list[tuple[bytes, bytes]] = []
        if isinstance(error, Unauthorized) and getattr(error, "challenge", False):
            headers.append((b"WWW-Authenticate", b'Basic realm="pypi"'))
        if isinstance(error, (TooManyRequests, StorageUnavailable)):
            headers.append((b"Retry-After", str(error.retryAfter).encode("ascii")))
        buffered, self._gateBuffer = sum(map(len, self._gateBuffer)), None
        self.requests[-1].refuse(error.status, error.message, headers, close=False)
        # Read and drop what the client still sends of the body (for LINGER
        # seconds at most), so it reads the answer rather than a reset.
        self.persistent = False
        self._discarding = True
        self._discardLeft = self.length
        self._lingerCall = self.callLater(LINGER, self._closeSoon)
        self._networkProducer.resumeProducing()
        self._discard(buffered)

    def _discard(self, count: int) -> None:
        if self._discardLeft is None:
            return
        self._discardLeft -= count
        if self._discardLeft <= 0:
            self._discardLeft = None
            self._closeSoon()

    def rawDataReceived(self, data: bytes) -> None:
        if self._discarding:
            self._discard(len(data))
            return
        if self._gateBuffer is not None:
            self._gateBuffer.append(data)
            return
        if self._bodyCall is not None:
            self._bodyBytes += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._stopBodyCall()
        self.site._notWaiting(self)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            # Waiting for the client again (any pipelined request is parsed next).
            self.site._waitingOn(self)
        super().requestDone(request)

    def _checkBody(self) -> None:
        self._bodyCall = None
        if self._gone or not self.requests or self.requests[-1]._refused:
            return
        assert self.bodyTimeout is not None
        if self._bodyBytes >= self.minBodyRate * self.bodyTimeout or self.requests[-1].bodyPaused:
            self._bodyBytes = 0
            self._bodyCall = self.callLater(self.bodyTimeout, self._checkBody)
            return
        log.info(
            "closing the connection from {peer}: request body slower than {rate} bytes/s over {timeout}s",
            peer=str(self.transport.getPeer()), rate=self.minBodyRate, timeout=self.bodyTimeout,
        )
        self.requests[-1].refuse(
            408, f"request body not received in time: it must come at {self.minBodyRate} bytes a second "
                 f"or more, measured over {self.bodyTimeout:g}s (--body-timeout, --min-body-rate)",
            close=False,
        )
        self._closeSoon()

    def _stopBodyCall(self) -> None:
        if self._bodyCall is not None and self._bodyCall.active():
            self._bodyCall.cancel()
        self._bodyCall = None

    def evict(self) -> None:
        """Give up this connection for a newer one: a request in progress gets 503."""
        self._stopBodyCall()
        retry = [(b"Retry-After", b"5")]
        if self._gateBuffer is not None or (self.requests and not self.line_mode and not self._handlingRequest):
            self._gateBuffer = None
            self.requests[-1].refuse(503, EVICTED, retry, close=False)
        elif self.requests or self._headStarted is not None:
            self.transport.write(rawAnswer(503, EVICTED, retry))
        self._closeSoon()

    def _closeSoon(self) -> None:
        """Close once the answer is sent; cut off a client that does not read it."""
        if self._gone or self.transport.disconnecting:
            return
        self._discarding = True
        self.loseConnection()
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

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
        self.transport.write(rawAnswer(408, f"no complete request head within {self.headerTimeout} seconds "
                                            f"(--header-timeout)", reason=b"Request Timeout"))
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
        self.transport.write(rawAnswer(400, message, reason=b"Bad Request"))
        self.loseConnection()

    _secure: bool | None = None

    def isSecure(self) -> bool:
        # Asked for every answer (HSTS); the transport does not change.
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def connectionLost(self, reason: Failure) -> None:
        self._gone = True
        self._stopBodyCall()
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        if self._headerCall is not None and self._headerCall.active():
            self._headerCall.cancel()
        self._headerCall = None
        try:
            super().connectionLost(reason)
        finally:
            self.site._channelClosed(self)
