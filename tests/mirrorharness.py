"""
The whole server in memory with C{root/pypi} mirroring a L{FakePyPI}.

L{MirrorHarness} is L{ServerHarness} - the server built by the factory
C{makeService} uses, L{devpi_twisted.app.compose.buildServer} - whose
upstream agent is a L{RequestTraversalAgent} over the fake's resource, so
no socket is opened; the mirror parts around it are production's, limits
included: redirects followed, pages decoded, at most
C{--max-upstream-fetches} upstream requests at once, C{--request-timeout}.
Upstream and our server share the test's L{Clock}, so timeouts, back-off
and slow files are driven by C{clock.advance}.

Requests are pumped inner stub first (upstream), then the outer one, as
treq's in-memory transports need.  L{RawClient} speaks raw HTTP to the
server's site over a fake TCP connection, for the tests that must see
exactly what went over the wire or drop the connection half-way.
"""

import hashlib
import json as jsonlib
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .releaseharness import (
    BASE,
    PIP_ACCEPT,
    Answer,
    Headers,
    RawAnswer,
    ServerHarness,
    _TCPLikeTransport,
    combine,
    parseRawResponse,
)

UPSTREAM = "http://upstream.test/simple/"
TIMEOUT = 5.0


class MirrorHarness(ServerHarness):
    """
    L{ServerHarness} (users root, alice, bob, carol) whose C{root/pypi}
    mirrors C{self.fake}.
    """

    def __init__(self, testCase: SynchronousTestCase, *, offlineMode: bool = False,
                 expiry: int = 1800, timeout: float = TIMEOUT, mirrorURL: str = UPSTREAM) -> None:
        self.timeout = timeout
        self.rawClients: list[RawClient] = []
        self.upstreamHeaders: list[tuple[str, dict[bytes, list[bytes]]]] = []
        super().__init__(testCase, rootPypi=True)
        self.restart(offlineMode=offlineMode)
        self.modifyIndex("root", "pypi", {"mirror_url": mirrorURL, "mirror_cache_expiry": expiry},
                         auth=self.root)

    def upstreamResource(self) -> Resource:
        """The fake upstream, recording what it is asked."""
        self.recording = _Recording(self.fake.resource(), self.upstreamHeaders)
        self.recording.stall = set()
        self.recording.redirects = {}
        return self.recording

    def stop(self) -> None:
        """The server stops: its raw connections are closed too."""
        for client in getattr(self, "rawClients", ()):
            client.lose(Failure(ConnectionLost("the server stopped")))
        super().stop()

    def restart(self, offlineMode: bool = False, filesElsewhere: Any = None) -> None:
        """
        Build the server anew over the same storage and upstream, as a
        restarted server would (in-memory state, such as freshness and the
        status machines, is lost).
        """
        self.build(filesElsewhere, offlineMode=offlineMode, requestTimeout=self.timeout)

    def begin(self, method: str, path: str, headers: Headers | None = None) -> "Deferred[Answer]":
        """Start a request without waiting; the Deferred fires with the whole answer."""
        url = path if path.startswith("http") else BASE + path

        async def read() -> Answer:
            response = await self.treq.request(method, url, headers=headers or {}, allow_redirects=False)
            content = await response.content()
            length = response.length if isinstance(response.length, int) else None
            return Answer(response.code, response.phrase, response.headers, content, url,
                          None if method == "HEAD" else length)

        d = Deferred.fromCoroutine(read())
        for _ in range(20):
            self.pump()
        return d

    # the fake and what it saw

    def upstreamPaths(self) -> list[str]:
        """The paths upstream was asked for, in order."""
        return [path for _, path in self.fake.requests]

    def fileRequests(self) -> list[str]:
        """The file (and C{.metadata}) paths upstream was asked for."""
        return [path for path in self.upstreamPaths() if path.startswith("/files/")]

    def addWheel(self, name: str, version: str, **options: Any) -> tuple[str, bytes, bytes]:
        """Serve a real wheel (and its C{.metadata}) upstream; C{(filename, bytes, metadata)}."""
        from devpi_twisted.testing.fakepypi import buildWheel

        requiresDist = options.pop("requiresDist", ())
        filename, data, metadata = buildWheel(name, version, requiresDist=requiresDist,
                                              requiresPython=options.get("requiresPython"))
        options.setdefault("coreMetadata", metadata)
        self.fake.addFile(name, filename, data, **options)
        return filename, data, metadata

    # our server

    def mirrorPage(self, project: str, stage: str = "root/pypi", headers: Headers | None = None) -> Answer:
        """The JSON project page (whatever its status)."""
        return self.get(f"/{stage}/+simple/{project}/", combine({b"Accept": [PIP_ACCEPT]}, headers))

    def mirrorFiles(self, project: str, stage: str = "root/pypi") -> dict[str, dict[str, Any]]:
        """The file objects of a JSON page that must answer 200, by file name."""
        answer = self.mirrorPage(project, stage)
        self.testCase.assertEqual(answer.code, 200, answer.body)
        return {f["filename"]: f for f in answer.json["files"]}

    def mirrorFileURL(self, project: str, filename: str, stage: str = "root/pypi") -> str:
        return self.fileURL(stage, project, filename)

    def status(self) -> dict[str, Any]:
        """This mirror's entry of C{/+status}."""
        answer = self.get("/+status", {b"Accept": [b"application/json"]})
        return answer.json["result"]["mirrors"].get("root/pypi", {})

    def storedEntry(self, project: str, filename: str) -> Any:
        from devpi_twisted.model import keys

        return self.testCase.successResultOf(self.storage.read(
            lambda view: view.get(keys.fileKey("root", "pypi", project, filename))))

    def raw(self, data: bytes, site: Any = None) -> RawAnswer:  # type: ignore[override]
        client = RawClient(self, data)
        for _ in range(100_000):
            if client.transport.disconnecting:
                break
            self.pump()
        return client.close()


class _Recording(Resource):
    """Records the headers of every request, then lets the fake answer."""

    isLeaf = True

    def __init__(self, inner: Any, log: list[tuple[str, dict[bytes, list[bytes]]]]) -> None:
        super().__init__()
        self._inner = inner
        self._log = log

    stall: set[str] = set()
    redirects: dict[str, str] = {}

    def render(self, request: Any) -> Any:
        path = request.path.decode("latin-1")
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        self._log.append((path, headers))
        for prefix, target in self.redirects.items():
            if path.startswith(prefix):
                request.setResponseCode(301)
                request.setHeader(b"Location", (target + path[len(prefix):]).encode("utf-8"))
                return b""
        if path in self.stall:
            # Headers and the start of a body, then nothing: a stalled transfer.
            request.setHeader(b"Content-Type", b"application/vnd.pypi.simple.v1+json")
            request.write(b'{"meta": {"api-version": "1.0"}, "projects": [{"name": "early"}, ')
            return NOT_DONE_YET
        return self._inner.render(request)


class RawClient:
    """A raw HTTP connection to the harness's site that the test can drop at any moment."""

    def __init__(self, harness: MirrorHarness, request: bytes) -> None:
        self.harness = harness
        self.protocol = harness.makeSite().buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = _TCPLikeTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 3141),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.protocol.makeConnection(self.transport)
        self.lost = False
        harness.rawClients.append(self)
        self.protocol.dataReceived(request)
        self.aborted = False
        original = self.transport.abortConnection

        def abort() -> None:
            self.aborted = True
            original()

        self.transport.abortConnection = abort  # type: ignore[method-assign]

    def received(self) -> bytes:
        return self.transport.value()

    def body(self) -> bytes:
        return self.received().partition(b"\r\n\r\n")[2]

    def lose(self, reason: Failure) -> None:
        """The connection is gone (once: TCP tells a protocol once)."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(reason)

    def disconnect(self) -> None:
        """The client goes away."""
        self.lose(Failure(ConnectionLost("the client went away")))

    def close(self) -> RawAnswer:
        closed = self.transport.disconnecting
        self.lose(Failure(ConnectionLost()))
        return parseRawResponse(self.transport.value(), closed)


def rawRequest(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: devpi.test", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jsonOf(answer: Answer) -> Any:
    return jsonlib.loads(answer.body)
