"""
Slow clients and early refusals (issue 11): request bodies have a deadline
and a minimum rate, a full server gives the slot of the connection that
waited longest for its client to a new one, and a large upload that would be
refused is answered 401/403 from its head, before its body is read.
"""

import json
import os
import socket
import time
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.trial.unittest import SynchronousTestCase
from twisted.python import usage

from devpi_twisted.errors import Unauthorized
from devpi_twisted.web.limits import limitedRequestFactory
from devpi_twisted.web.channel import LINGER
from devpi_twisted.web.server import DevpiRequest, DevpiSite, SiteLimits

from .distbuilder import buildWheel, moduleName, writeDist
from .helpers import APIHarness, basicAuth, parseServerOptions
from .serverprocess import ROOT_PASSWORD, RealServerCase, tool
from .test_clients import _ClientCase
from .test_ops import Connection, Pages

LIMITS = SiteLimits(idleTimeout=None, headerTimeout=30, bodyTimeout=10, minBodyRate=100)


def postHead(path: bytes, length: int, headers: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: devpi.test\r\nContent-Length: %d\r\n" % length
            + headers + b"\r\n")


class SiteMixin:
    """A L{DevpiSite} over L{tests.test_ops.Pages} on a L{Clock}, with a large body limit."""

    def makeSite(self, limits: SiteLimits = LIMITS, gate: Any = None, resource: Any = None) -> DevpiSite:
        self.clock = Clock()
        self.pages = Pages()
        request = limitedRequestFactory(10 ** 9, [(b"X-Devpi-Api-Version", b"2")], base=DevpiRequest)
        self.site = DevpiSite(resource if resource is not None else self.pages, self.clock, limits, request, [],
                              gate)
        self.connections: list[Connection] = []
        self.addCleanup(self.closeAll)  # type: ignore[attr-defined]
        return self.site

    def connect(self) -> Connection:
        connection = Connection(self.site)
        self.connections.append(connection)
        return connection

    def closeAll(self) -> None:
        for connection in self.connections:
            if not connection.transport.disconnected:
                connection.close()

    def assertAnswer(self, connection: Connection, status: int, words: str) -> dict[bytes, bytes]:
        responses = connection.responses()
        self.assertEqual(len(responses), 1, connection.transport.value())  # type: ignore[attr-defined]
        code, headers, body = responses[0]
        self.assertEqual(code, status, body)  # type: ignore[attr-defined]
        self.assertEqual(headers[b"content-type"], b"application/json")  # type: ignore[attr-defined]
        self.assertIn(words, json.loads(body)["message"])  # type: ignore[attr-defined]
        return headers


class BodyDeadlineTests(SiteMixin, SynchronousTestCase):
    """Each --body-timeout seconds of a body must bring --min-body-rate bytes a second."""

    def test_drippedBodyGets408(self) -> None:
        """A body dripped a byte at a time is cut off with 408 after --body-timeout; it never reaches a resource."""
        self.makeSite()
        connection = self.connect()
        connection.send(postHead(b"/slow", 1000))
        for _ in range(4):
            self.clock.advance(2)
            connection.send(b"x")  # every byte resets the idle timeout, not this one
        self.clock.advance(1.9)
        self.assertEqual(connection.transport.value(), b"")
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertAnswer(connection, 408, "--body-timeout")
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(self.pages.pending, [])

    def test_steadyBodyGoesOn(self) -> None:
        """A body longer than --body-timeout is taken while it keeps coming at the minimum rate."""
        self.makeSite()
        connection = self.connect()
        connection.send(postHead(b"/slow", 4500))
        for _ in range(30):
            self.clock.advance(1)
            connection.send(b"y" * 150)
        self.assertFalse(connection.transport.disconnecting)
        [request] = self.pages.pending
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"y" * 4500)

    def test_stalledBodyCutOff(self) -> None:
        """A fast start does not buy a stall: the rate is counted per --body-timeout, not on average."""
        self.makeSite()
        connection = self.connect()
        connection.send(postHead(b"/slow", 100000) + b"z" * 50000)
        self.clock.advance(10)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(10)
        self.assertAnswer(connection, 408, "request body not received in time")
        self.assertEqual(self.pages.pending, [])

    def test_deadlineEndsWithBody(self) -> None:
        """A body that arrived leaves no deadline behind: the keep-alive connection serves more requests."""
        self.makeSite()
        connection = self.connect()
        connection.send(postHead(b"/json", 5) + b"hello")
        self.clock.advance(100)
        connection.get(b"/json")
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200])
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual([call for call in self.clock.getDelayedCalls() if call.func.__name__ == "_checkBody"], [])


class SlotTests(SiteMixin, SynchronousTestCase):
    """When every slot is taken, the connection that waited longest for its client makes room."""

    def test_newClientServedWhileSlowClientsHoldEverySlot(self) -> None:
        self.makeSite(SiteLimits(idleTimeout=None, headerTimeout=30, bodyTimeout=60, maxConnections=3))
        slow = []
        for _ in range(3):
            connection = self.connect()
            connection.send(postHead(b"/slow", 1000) + b"a")
            slow.append(connection)
            self.clock.advance(1)
        normal = self.connect()
        normal.get(b"/json")
        self.assertEqual(normal.responses()[0][0], 200)
        headers = self.assertAnswer(slow[0], 503, "waited longest")
        self.assertEqual(headers[b"retry-after"], b"5")
        self.assertTrue(slow[0].transport.disconnecting)
        self.assertEqual([c.transport.value() for c in slow[1:]], [b"", b""])
        self.assertEqual(self.site.evictedConnections, 1)
        self.assertEqual(len(self.site.channels), 3)
        self.assertEqual(self.pages.pending, [])

    def test_answeredAndCheckedConnectionsKept(self) -> None:
        """
        A connection whose request is being answered, or whose upload the body
        gate let in, keeps its slot; when only such connections are left, a new
        one is answered 503.
        """
        gate = lambda request, length: succeed(None) if request.path == b"/upload" else None  # noqa: E731
        self.makeSite(SiteLimits(idleTimeout=None, headerTimeout=30, bodyTimeout=60, maxConnections=3), gate=gate)
        answering, upload, anonymous = self.connect(), self.connect(), self.connect()
        answering.get(b"/slow")
        upload.send(postHead(b"/upload", 1000) + b"b")
        anonymous.send(postHead(b"/other", 1000) + b"c")
        newcomer = self.connect()
        newcomer.get(b"/slow")
        self.assertAnswer(anonymous, 503, "waited longest")
        self.assertEqual((answering.transport.value(), upload.transport.value()), (b"", b""))
        refused = self.connect()
        self.assertTrue(refused.transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.site.refusedConnections, 1)
        self.assertIn(newcomer.channel, self.site.channels)

    def test_idleConnectionMakesRoom(self) -> None:
        """An idle keep-alive connection that waited longer goes first, quietly."""
        self.makeSite(SiteLimits(idleTimeout=None, headerTimeout=30, bodyTimeout=60, maxConnections=2))
        idle = self.connect()
        idle.get(b"/json")
        self.clock.advance(1)
        slow = self.connect()
        slow.send(postHead(b"/slow", 1000))
        self.connect()
        self.assertTrue(idle.transport.disconnecting)
        self.assertEqual(len(idle.responses()), 1)
        self.assertFalse(slow.transport.disconnecting)


class BodyGateTests(SiteMixin, SynchronousTestCase):
    """The site asks the body gate before it reads a body, with the transport paused."""

    def setUp(self) -> None:
        self.asked: list[Deferred[None]] = []

        def gate(request: Any, length: int | None) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            self.asked.append(d)
            return d

        self.makeSite(gate=gate)

    def test_bodyWaitsForTheGate(self) -> None:
        connection = self.connect()
        connection.send(postHead(b"/slow", 10, b"Expect: 100-continue\r\n") + b"01234")
        self.assertEqual(connection.transport.producerState, "paused")
        self.assertEqual(connection.transport.value(), b"", "no 100 Continue before the gate agrees")
        self.asked[0].callback(None)
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 100 Continue"))
        connection.send(b"56789")
        [request] = self.pages.pending
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"0123456789")

    def test_refusedBeforeTheBody(self) -> None:
        connection = self.connect()
        connection.send(postHead(b"/slow", 10 ** 8) + b"x" * 1000)
        error = Unauthorized("no valid credentials, log in to upload")
        error.challenge = True  # type: ignore[attr-defined]
        self.asked[0].errback(error)
        headers = self.assertAnswer(connection, 401, "log in to upload")
        self.assertEqual(headers[b"www-authenticate"], b'Basic realm="pypi"')
        self.assertEqual(headers[b"x-devpi-api-version"], b"2")
        self.assertEqual(connection.transport.producerState, "producing", "what follows is read and dropped")
        connection.send(b"x" * 100000)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(LINGER)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(self.pages.pending, [])
        self.assertEqual(len(connection.responses()), 1)

    def test_clientGoneWhileDeciding(self) -> None:
        connection = self.connect()
        connection.send(postHead(b"/slow", 10 ** 8))
        connection.close()
        self.asked[0].callback(None)
        self.assertEqual(self.pages.pending, [])


class UploadGateTests(SiteMixin, SynchronousTestCase):
    """The real routes: a large upload is checked from its head (credentials, the index's acl_upload)."""

    def setUp(self) -> None:
        self.harness = APIHarness(self)
        self.harness.createUser("alice")
        self.harness.createUser("bob")
        self.harness.createIndex("alice", "dev")
        self.makeSite(SiteLimits(), gate=self.harness.server.site.bodyGate, resource=self.harness.resource)

    def upload(self, length: int, auth: bytes = b"", path: bytes = b"/alice/dev/") -> Connection:
        connection = self.connect()
        connection.send(postHead(path, length, b"Content-Type: multipart/form-data; boundary=xyz\r\n" + auth))
        return connection

    def auth(self, user: str, password: str) -> bytes:
        return b"Authorization: " + basicAuth(user, password)[b"Authorization"][0] + b"\r\n"

    def test_anonymous401(self) -> None:
        connection = self.upload(10 ** 8)
        headers = self.assertAnswer(connection, 401, "log in to upload")
        self.assertEqual(headers[b"www-authenticate"], b'Basic realm="pypi"')
        self.assertIsNone(getattr(connection.channel.requests[-1], "content", None), "nothing spooled")

    def test_wrongPassword401(self) -> None:
        connection = self.upload(10 ** 8, self.auth("alice", "wrong"))
        self.assertAnswer(connection, 401, "")

    def test_notPermitted403(self) -> None:
        connection = self.upload(10 ** 8, self.auth("bob", "secret"))
        self.assertAnswer(connection, 403, "bob")

    def test_noSuchIndex404(self) -> None:
        connection = self.upload(10 ** 8, self.auth("alice", "secret"), b"/alice/nope/")
        self.assertAnswer(connection, 404, "")

    def test_permittedBodyTaken(self) -> None:
        connection = self.upload(10 ** 8, self.auth("alice", "secret"))
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertIsNotNone(connection.channel.requests[-1].content)

    def test_smallBodyNotAsked(self) -> None:
        """Small bodies are read first, as before: the view answers 401 once the body is in."""
        connection = self.upload(1000)
        self.assertEqual(connection.transport.value(), b"")
        connection.send(b"x" * 1000)
        self.assertEqual(connection.responses()[0][0], 401)


class BodyOptionsTests(SynchronousTestCase):
    """--body-timeout and --min-body-rate reach the site's limits."""

    def parse(self, *argv: str, environ: dict[str, str] | None = None) -> Any:
        return parseServerOptions(self, *argv, environ=environ)

    def test_defaultsAndSet(self) -> None:
        config = self.parse().toConfig()
        self.assertEqual((config.bodyTimeout, config.minBodyRate), (60.0, 8192))
        config = self.parse("--body-timeout", "5", environ={"DEVPI_TWISTED_MIN_BODY_RATE": "100"}).toConfig()
        self.assertEqual((config.bodyTimeout, config.minBodyRate), (5.0, 100))

    def test_positive(self) -> None:
        for argv in (["--body-timeout", "0"], ["--min-body-rate", "-1"]):
            with self.assertRaises(usage.UsageError) as raised:
                self.parse(*argv)
            self.assertIn(argv[0], str(raised.exception))


# ---------------------------------------------------------------- the real server


class _Dripper(Protocol):
    """Sends a request head, then its body one byte a second."""

    def connectionMade(self) -> None:
        self.factory.connected += 1  # type: ignore[attr-defined]
        self.received = b""
        self.transport.write(postHead(b"/+login", 10000, b"Content-Type: application/json\r\n"))
        self._drip = LoopingCall(self.transport.write, b" ")
        self._drip.start(1.0, now=False)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        if self._drip.running:
            self._drip.stop()
        self.factory.lost += 1  # type: ignore[attr-defined]


class _Drippers(ClientFactory):
    protocol = _Dripper

    def __init__(self) -> None:
        self.connected = 0
        self.lost = 0
        self.protocols: list[_Dripper] = []

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        self.protocols.append(p)
        return p


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send C{data} (a head only) and read one whole answer; how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while True:
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")]
                if lengths and len(body) >= int(lengths[0]):
                    break
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer, time.monotonic() - started


class SlowClientServerTests(RealServerCase):
    """The real server on 127.0.0.1 with 200 slow clients holding every slot."""

    timeout = 90
    SLOW = 200

    def setUp(self) -> Deferred:
        return self.startForeground("--max-connections", str(self.SLOW), "--no-access-log")

    async def test_normalClientServedWhileSlowClientsHoldConnections(self) -> None:
        drippers = _Drippers()
        self.addCleanup(lambda: [p.transport.abortConnection() for p in drippers.protocols if p.transport])
        for _ in range(self.SLOW):
            reactor.connectTCP("127.0.0.1", self.port, drippers)
        deadline = time.monotonic() + 20
        while drippers.connected < self.SLOW and time.monotonic() < deadline:
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(drippers.connected, self.SLOW)
        await deferLater(reactor, 2.0, lambda: None)  # a few bytes each: every slot held
        self.assertEqual(drippers.lost, 0, "the slow clients hold their connections")

        started = time.monotonic()
        response = await self.http.get(self.url + "/+api", timeout=10)
        self.assertEqual(response.code, 200, await response.content())
        await response.content()
        response = await self.http.post(
            self.url + "/+login", data=json.dumps({"user": "root", "password": ROOT_PASSWORD}).encode(),
            headers={b"Content-Type": [b"application/json"]}, timeout=10)
        self.assertEqual(response.code, 200, await response.content())
        self.assertIn("password", json.loads(await response.content())["result"])
        self.assertLess(time.monotonic() - started, 5)
        deadline = time.monotonic() + 5
        while drippers.lost < 1 and time.monotonic() < deadline:
            await deferLater(reactor, 0.1, lambda: None)
        evicted = [p.received for p in drippers.protocols if p.received]
        self.assertTrue(1 <= len(evicted) <= 3, evicted)
        self.assertTrue(all(b"waited longest" in answer for answer in evicted), evicted)
        self.assertLess(drippers.lost, 10, "the other slow clients keep their connections")

    async def test_largeUploadRefusedFromItsHead(self) -> None:
        """401 (anonymous) and 403 (not permitted) come at once for a 100 MB body never sent."""
        headers = {**basicAuth("root", ROOT_PASSWORD), b"Content-Type": [b"application/json"]}
        for method, path, body in [("PUT", "/bob", {"password": "bobpw"}), ("PUT", "/root/dev", {"bases": []})]:
            response = await self.http.request(method, self.url + path, data=json.dumps(body).encode(),
                                               headers=headers)
            self.assertIn(response.code, (200, 201), await response.content())
        head = (b"POST /root/dev/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n"
                b"Content-Type: multipart/form-data; boundary=xyz\r\n")
        bob = b"Authorization: " + basicAuth("bob", "bobpw")[b"Authorization"][0] + b"\r\n"
        results = await gatherResults([
            threads.deferToThread(exchange, self.port, head + b"\r\n"),
            threads.deferToThread(exchange, self.port, head + bob + b"\r\n"),
        ])
        (anonymous, tookA), (forbidden, tookB) = results
        self.assertTrue(anonymous.startswith(b"HTTP/1.1 401 "), anonymous)
        self.assertIn(b"WWW-Authenticate: Basic", anonymous)
        self.assertIn("log in", json.loads(anonymous.partition(b"\r\n\r\n")[2])["message"])
        self.assertTrue(forbidden.startswith(b"HTTP/1.1 403 "), forbidden)
        self.assertIn("bob", json.loads(forbidden.partition(b"\r\n\r\n")[2])["message"])
        self.assertLess(max(tookA, tookB), 5)
        self.assertEqual(os.listdir(os.path.join(self.workdir, "server", "+spool")), [])


class LargeUploadClientTests(_ClientCase):
    """Uploads large enough for the body gate, with the real clients."""

    def bigWheel(self, version: str = "1.0") -> Any:
        return buildWheel(version=version,
                          extraFiles={f"{moduleName('demo-pkg')}/blob.bin": os.urandom(400 * 1024)})

    async def test_twineAndUvThroughTheGate(self) -> None:
        """An upload its head shows permitted goes on as before (twine, then uv publish of another file)."""
        wheel = self.bigWheel()
        self.assertSucceeded(await self.twineUpload("alice/dev", wheel))
        other = self.bigWheel("2.0")
        self.assertSucceeded(await self.uvPublish("alice/dev", other))
        self.assertEqual(await self.simpleFiles("alice/dev", "demo-pkg"),
                         {wheel.filename: wheel.sha256, other.filename: other.sha256})

    async def test_twineWrongPasswordSeesTheAnswer(self) -> None:
        """A refused large upload is answered at once, and twine shows the 401, not a reset connection."""
        wheel = self.bigWheel()
        path = writeDist(wheel, self.distDir("dist-wrong"))
        result = await self.runClient(
            tool("twine"), "upload", "--repository-url", f"{self.server.url}/alice/dev/",
            "-u", "alice", "-p", "wrong", "--non-interactive", "--disable-progress-bar", path,
        )
        self.assertNotEqual(result.returncode, 0, result.output)
        self.assertIn("401", result.output)
        self.assertIsNone(await self.simpleFiles("alice/dev", "demo-pkg"))
