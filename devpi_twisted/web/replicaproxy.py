"""
What a replica sends to its primary instead of answering itself.

L{ReplicaProxyResource} wraps the replica's whole site:

  - every request that may write (any method but GET and HEAD, except the
    read-only POSTs to C{+api} and C{+status}) is forwarded to the primary
    with its path, query, headers (credentials included) and body; the
    primary's answer is relayed with C{X-Devpi-Proxy: replica}, after
    waiting (at most L{ReplicaProxyResource.serialWait} seconds) until this
    replica has applied the serial the answer names, so a client that reads
    right after its write sees it;
  - GETs that need the upstream of a mirror index are forwarded too, as
    only the primary may ask upstream (and caches what it fetched, which
    then replicates here): C{+f/} files of a mirror index that are not
    stored here yet, project lists of mirror-backed indexes, and simple
    project pages that a mirror contributes to, unless the primary answered
    the same page less than the mirror's C{mirror_cache_expiry} ago and
    every contributing mirror's cached links have replicated here: the
    primary would not have asked upstream again either, so the replica
    renders the page itself from the same links.  When the primary cannot
    be reached they are answered from what this replica has (its mirrors
    run in offline mode);
  - everything else is served by the replica itself.
"""

import json
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from devpi_twisted.interfaces import IBlobStore, IStorage
from devpi_twisted.replica.readplan import ReadPlan, planRead
from devpi_twisted.storage.readers import BytesBodyProducer, FileObjectReader, ReaderBodyProducer, RunFile
from devpi_twisted.web.context import outsideURL
from devpi_twisted.web.limits import SPOOL_THRESHOLD

log = Logger()

_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade",
}
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length"}
_READ_ONLY_POSTS = ("+api", "+status")
_SMALL_BODY = SPOOL_THRESHOLD  # bodies twisted.web keeps in memory are sent at once
_MAX_PAGES_REMEMBERED = 100000


class _Relay(Protocol):
    """Streams the primary's body to the client, pausing the primary when the client is slow."""

    def __init__(self, request: IRequest, gone: bool = False) -> None:
        self._request = request
        self._gone = gone
        self.done: Deferred[None] = Deferred()
        if not gone:
            request.notifyFinish().addErrback(self._clientGone)

    def connectionMade(self) -> None:
        if self._gone:
            self.transport.stopProducing()
        else:
            self._request.registerProducer(self.transport, True)

    def _clientGone(self, reason: Failure) -> None:
        self._gone = True
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self._gone:
            self._request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if not self._gone:
            self._request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                self._request.finish()
            else:
                # The client must not take a cut body for a whole one.
                transport = getattr(self._request.channel, "transport", None)
                if transport is not None:
                    transport.abortConnection()
        if not self.done.called:
            self.done.callback(None)


def _gone(request: IRequest) -> bool:
    """Whether the client went away (or was answered): nothing more may be written."""
    return bool(request.finished or getattr(request, "_disconnected", False))


def _segments(path: bytes) -> list[str]:
    return [unquote(s.decode("utf-8", "replace")) for s in path.split(b"/")[1:]]


def mirrorTarget(path: bytes) -> tuple[str, str, str, list[str]] | None:
    """
    C{(kind, user, index, rest)} for a path that may need a mirror's
    upstream (C{kind} is C{"+simple"} or C{"+f"}), else C{None}.
    """
    parts = _segments(path)
    if len(parts) >= 3 and parts[2] in ("+simple", "+f") and parts[0] and parts[1]:
        return parts[2], parts[0], parts[1], parts[3:]
    return None


def isReadOnlyPost(request: IRequest) -> bool:
    """POSTs that only read: C{+api} and C{+status} (devpi allows both methods)."""
    parts = [p for p in _segments(request.path) if p]
    return request.method == b"POST" and bool(parts) and parts[-1] in _READ_ONLY_POSTS and len(parts) <= 3


class ReplicaProxyResource(Resource):
    """
    The replica's site root: forwards to the primary what the replica must
    not answer itself, and hands the rest to C{local}.

    @param agent: an C{IAgent} for requests to the primary.
    @param runFile: reads request bodies spooled to disk off the reactor
        (the storage runner's C{runFile}).
    @param replica: the follower (C{waitForSerial}, C{isReachable},
        C{primaryAnswered}).
    """

    isLeaf = True
    writeTimeout = 300.0
    readTimeout = 60.0
    serialWait = 10.0

    def __init__(self, local: Resource, agent: IAgent, primaryURL: str, storage: IStorage, blobs: IBlobStore,
                 clock: IReactorTime, replica: Any, outsideURL: str | None = None,
                 runFile: RunFile = maybeDeferred) -> None:
        super().__init__()
        self._runFile = runFile
        self._local = local
        self._agent = agent
        self._primaryURL = primaryURL.rstrip("/")
        self._storage = storage
        self._blobs = blobs
        self._clock = clock
        self._replica = replica
        self._outsideURL = outsideURL
        self.forwarded = 0
        # (user, index, project) -> when the primary last answered that page
        self._pagesAnswered: dict[tuple[str, str, str], float] = {}

    def render(self, request: IRequest) -> Any:
        if request.method in (b"GET", b"HEAD") or isReadOnlyPost(request):
            target = mirrorTarget(request.path) if request.method != b"POST" else None
            if target is None or not self._replica.isReachable():
                return self._local.render(request)
            d = Deferred.fromCoroutine(self._readOrForward(request, target))
        else:
            d = Deferred.fromCoroutine(self._forwardWrite(request))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _renderLocal(self, request: IRequest) -> None:
        if _gone(request):
            return
        body = self._local.render(request)
        if body is not NOT_DONE_YET:
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

    def _answeredRecently(self, plan: ReadPlan) -> bool:
        if plan.page is None or not plan.linksHere:
            return False
        answered = self._pagesAnswered.get(plan.page)
        return answered is not None and self._clock.seconds() - answered < plan.expiry

    def _pageAnswered(self, plan: ReadPlan) -> None:
        if plan.page is None:
            return
        if len(self._pagesAnswered) >= _MAX_PAGES_REMEMBERED:
            self._pagesAnswered.clear()
        self._pagesAnswered[plan.page] = self._clock.seconds()

    async def _readOrForward(self, request: IRequest, target: tuple[str, str, str, list[str]]) -> None:
        kind, user, index, rest = target
        plan = await planRead(self._storage, kind, user, index, rest)
        forward = plan.forward and not self._answeredRecently(plan)
        if not forward and plan.digest is not None:
            forward = not await self._blobs.exists(plan.digest)
        if not forward:
            self._renderLocal(request)
            return
        try:
            response = await self._send(request, self.readTimeout)
        except CancelledError:
            raise
        except Exception as e:
            log.info("replica: the primary did not answer {path} ({error}); answering from what is here",
                     path=request.path.decode("latin-1"), error=str(e) or type(e).__name__)
            self._renderLocal(request)
            return
        if response.code == 200:
            self._pageAnswered(plan)
        if _gone(request):
            response.deliverBody(_Relay(request, gone=True))
            return
        self._relayHeaders(request, response)
        relay = _Relay(request)
        response.deliverBody(relay)
        await relay.done

    async def _forwardWrite(self, request: IRequest) -> None:
        try:
            response = await self._send(request, self.writeTimeout)
            body = await readBody(response)
        except CancelledError:
            raise
        except Exception as e:
            self._error(request, 502, f"the primary {self._primaryURL} cannot be reached to make this change: "
                                      f"{str(e) or type(e).__name__}")
            return
        self._replica.primaryAnswered()
        if response.code < 400:
            serials = response.headers.getRawHeaders(b"x-devpi-serial")
            if serials and serials[-1].isdigit():
                reached = await self._replica.waitForSerial(int(serials[-1]), self.serialWait)
                if not reached:
                    log.warn("replica: change {serial} did not arrive within {seconds}s of the primary's answer",
                             serial=int(serials[-1]), seconds=self.serialWait)
        if _gone(request):
            return
        self._relayHeaders(request, response)
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _outgoingHeaders(self, request: IRequest) -> Headers:
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _NOT_FORWARDED:
                headers.setRawHeaders(name, values)
        # A client's own X-Outside-Url counts only from this replica's trusted proxies.
        headers.setRawHeaders(b"X-Outside-Url", [outsideURL(request, self._outsideURL).encode("utf-8")])
        client = request.getClientAddress()
        forwarded = headers.getRawHeaders(b"x-forwarded-for", [])
        headers.setRawHeaders(b"X-Forwarded-For", [b", ".join(
            [*forwarded, str(getattr(client, "host", "unknown")).encode("ascii", "replace")])])
        headers.setRawHeaders(b"X-Devpi-Proxy", [b"replica"])
        return headers

    async def _send(self, request: IRequest, timeout: float) -> Any:
        self.forwarded += 1
        producer: IBodyProducer | None = None
        if request.method not in (b"GET", b"HEAD") and request.content is not None:
            content = request.content
            content.seek(0, 2)
            size = content.tell()
            content.seek(0)
            if size <= _SMALL_BODY:
                producer = BytesBodyProducer(content.read())
            else:
                # Spooled to disk: read in the storage threads as the connection takes it.
                producer = ReaderBodyProducer(FileObjectReader(content, size, self._runFile))
        url = self._primaryURL.encode("utf-8") + request.uri
        d = self._agent.request(request.method, url, self._outgoingHeaders(request), producer)
        d.addTimeout(timeout, self._clock)
        return await d

    def _relayHeaders(self, request: IRequest, response: Any) -> None:
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                continue
            if lower == b"location":
                values = [self._rewriteLocation(request, v) for v in values]
            request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"X-Devpi-Proxy", b"replica")

    def _rewriteLocation(self, request: IRequest, location: bytes) -> bytes:
        primary = self._primaryURL.encode("utf-8")
        if location.startswith(primary):
            return outsideURL(request, self._outsideURL).encode("utf-8") + location[len(primary):]
        return location

    def _error(self, request: IRequest, code: int, message: str) -> None:
        if _gone(request):
            return
        body = (json.dumps({"message": message}, indent=2) + "\n").encode("utf-8")
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        request.setHeader(b"X-Devpi-Api-Version", b"2")
        request.setHeader(b"X-Devpi-Serial", str(self._storage.currentSerial()).encode("ascii"))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: IRequest) -> None:
        if failure.check(CancelledError) or _gone(request):
            return
        log.failure("replica: forwarding {method} {path} failed", failure=failure,
                    method=request.method.decode("ascii", "replace"), path=request.path.decode("latin-1"))
        if not request.startedWriting:
            self._error(request, 500, "internal server error")
        else:
            request.finish()
