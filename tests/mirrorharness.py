"""
The whole server in memory with C{root/pypi} mirroring a L{FakePyPI}.

L{MirrorHarness} extends L{ServerHarness} with the mirror parts wired as
L{devpi_twisted.app.tap.makeMirrors} and C{makeService} wire them: an
L{UpstreamClient} whose agent (a L{RequestTraversalAgent} over the fake's
resource, behind a L{RedirectAgent}, pages decoded by a
L{ContentDecoderAgent}) never opens a socket, L{Mirrors}, and
L{SimplePages} and the web resource that use them.  Upstream and our
server share the test's L{Clock}, so timeouts, back-off and slow files are
driven by C{clock.advance}.

Requests are pumped inner stub first (upstream), then the outer one, as
treq's in-memory transports need.  L{RawClient} speaks raw HTTP to a
L{Site} over a fake TCP connection, for the tests that must see exactly
what went over the wire or drop the connection half-way.
"""

import hashlib
import json as jsonlib
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ContentDecoderAgent, GzipDecoder, RedirectAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from devpi_twisted.mirror.service import Mirrors
from devpi_twisted.mirror.upstream import UpstreamClient
from devpi_twisted.services.simple import SimplePages
from devpi_twisted.testing.fakepypi import FakePyPI
from devpi_twisted.services.users import Users
from devpi_twisted.services.indexes import Indexes
from devpi_twisted.web.routes import makeWebResource

from .releaseharness import (
    BASE,
    PIP_ACCEPT,
    UUID,
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
        super().__init__(testCase, rootPypi=True)
        self.fake = FakePyPI(self.clock)
        self.upstreamHeaders: list[tuple[str, dict[bytes, list[bytes]]]] = []
        self.recording = _Recording(self.fake.resource(), self.upstreamHeaders)
        self.recording.stall = set()
        self.recording.redirects = {}
        self.upstreamAgent = RequestTraversalAgent(self.recording)
        self.timeout = timeout
        self.mirrors: Mirrors | None = None
        self.restart(offlineMode=offlineMode)
        self.modifyIndex("root", "pypi", {"mirror_url": mirrorURL, "mirror_cache_expiry": expiry},
                         auth=self.root)
        testCase.addCleanup(self.stop)

    def restart(self, offlineMode: bool = False, filesElsewhere: Any = None) -> None:
        """
        Build the mirror parts, the page cache and the web resource anew over
        the same storage, as a restarted server would (in-memory state, such
        as freshness and the status machines, is lost).
        """
        self.stop()
        agent = RedirectAgent(self.upstreamAgent)
        pageAgent = ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)])
        self.upstream = UpstreamClient(agent, pageAgent, self.clock, timeout=self.timeout,
                                       idleTimeout=self.timeout * 6)
        self.mirrors = Mirrors(self.storage, self.blobs, self.upstream, self.clock, offlineMode=offlineMode,
                               filesElsewhere=filesElsewhere)
        self.pages = SimplePages(self.storage, self.mirrors)
        self.resource = makeWebResource(
            config=self.config,
            nodeinfo={"uuid": UUID, "role": "standalone", "storage": "memory"},
            storage=self.storage,
            blobs=self.blobs,
            auth=self.auth,
            users=Users(self.storage, self.auth, self.config.policy),
            indexes=Indexes(self.storage, self.config.policy, 1800),
            releases=self.releases,
            pages=self.pages,
            mirrors=self.mirrors,
            version="0.0-test",
        )
        self.treq = StubTreq(self.resource)
        self.mirrors.startService()

    def stop(self) -> None:
        if self.mirrors is not None and self.mirrors.running:
            self.mirrors.stopService()

    # pumping

    def pump(self) -> None:
        """One round: due calls on the clock, then upstream's connections, then ours."""
        self.clock.advance(0)
        self.upstreamAgent.flush()
        self.treq.flush()

    def settle(self, d: Deferred) -> Any:
        box: list[Any] = []
        d.addBoth(box.append)
        for _ in range(100_000):
            if box:
                break
            self.pump()
        if not box:
            self.testCase.fail("the request never finished")
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

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

    def disconnect(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionLost("the client went away")))

    def close(self) -> RawAnswer:
        closed = self.transport.disconnecting
        self.protocol.connectionLost(Failure(ConnectionLost()))
        return parseRawResponse(self.transport.value(), closed)


def rawRequest(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: devpi.test", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jsonOf(answer: Answer) -> Any:
    return jsonlib.loads(answer.body)
