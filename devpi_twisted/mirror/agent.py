# -*- test-case-name: tests.test_ops -*-
"""
An L{IAgent} for upstream requests that caps how many run at once and
counts them.

All mirrors share one L{DeferredSemaphore} (C{--max-upstream-fetches}): a
request waits for a slot before it is sent, and keeps the slot until its
body has been read (or, if nobody ever reads it, for C{releaseAfter}
seconds), so a burst of cache misses cannot open an unbounded number of
upstream connections.  A request cancelled while it waits (the upstream
client's timeout) gives up its place in the queue.

What happens is told to an L{IUpstreamCounter} (the metrics implement it).
"""

from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IResponse
from zope.interface import Interface, implementer


class IUpstreamCounter(Interface):
    """Counts what the upstream agents do; called on the reactor thread, so cheap."""

    def waitingChanged(change: int) -> None:
        """Requests waiting for a free slot went up or down by C{change}."""

    def activeChanged(change: int) -> None:
        """Requests holding a slot went up or down by C{change}."""

    def answered(kind: str, status: int) -> None:
        """A request of C{kind} (C{page} or C{file}) got an answer with C{status}."""

    def failed(kind: str) -> None:
        """A request of C{kind} got no answer."""

    def received(kind: str, size: int) -> None:
        """C{size} bytes of a C{kind} body arrived."""


class _Slot:
    """One held place in the semaphore; released once."""

    def __init__(self, semaphore: DeferredSemaphore, stats: IUpstreamCounter) -> None:
        self._semaphore = semaphore
        self._stats = stats
        self._held = True
        self.timer: IDelayedCall | None = None

    def release(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self._held:
            self._held = False
            self._stats.activeChanged(-1)
            self._semaphore.release()


class _CountingBody(Protocol):
    """Passes a response body on, counting it, and frees the slot at its end."""

    def __init__(self, wrapped: IProtocol, slot: _Slot, stats: IUpstreamCounter, kind: str) -> None:
        self._wrapped = wrapped
        self._slot = slot
        self._stats = stats
        self._kind = kind

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._wrapped.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._stats.received(self._kind, len(data))
        self._wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._slot.release()
        self._wrapped.connectionLost(reason)


class _Response(proxyForInterface(IResponse, "_original")):  # type: ignore[misc]
    def __init__(self, original: IResponse, slot: _Slot, stats: IUpstreamCounter, kind: str) -> None:
        super().__init__(original)
        self._slot = slot
        self._stats = stats
        self._kind = kind

    def deliverBody(self, protocol: IProtocol) -> None:
        if self._slot.timer is not None and self._slot.timer.active():
            self._slot.timer.cancel()
        self._original.deliverBody(_CountingBody(protocol, self._slot, self._stats, self._kind))


@implementer(IAgent)
class LimitedAgent:
    """
    @param agent: the agent that sends the requests.
    @param semaphore: shared by every L{LimitedAgent} of the server.
    @param clock: for the release of unread responses.
    @param kind: the metrics label, C{page} or C{file}.
    @param stats: where the counts go.
    @param releaseAfter: seconds a response may wait for its body to be read
        before its slot is given back anyway.
    """

    def __init__(self, agent: IAgent, semaphore: DeferredSemaphore, clock: IReactorTime, kind: str,
                 stats: IUpstreamCounter, releaseAfter: float = 30.0) -> None:
        self._agent = agent
        self._semaphore = semaphore
        self._clock = clock
        self._kind = kind
        self._stats = stats
        self._releaseAfter = releaseAfter

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[IResponse]:
        return Deferred.fromCoroutine(self._request(method, uri, headers, bodyProducer))

    async def _request(self, method: bytes, uri: bytes, headers: Any, bodyProducer: Any) -> IResponse:
        self._stats.waitingChanged(1)
        try:
            await self._semaphore.acquire()
        finally:
            self._stats.waitingChanged(-1)
        self._stats.activeChanged(1)
        slot = _Slot(self._semaphore, self._stats)
        try:
            response = await self._agent.request(method, uri, headers, bodyProducer)
        except BaseException:
            self._stats.failed(self._kind)
            slot.release()
            raise
        self._stats.answered(self._kind, response.code)
        slot.timer = self._clock.callLater(self._releaseAfter, slot.release)
        return _Response(response, slot, self._stats, self._kind)
