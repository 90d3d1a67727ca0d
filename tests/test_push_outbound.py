"""
External push (C{posturl}): the request a client makes this server send.

A receiver served by the test on 127.0.0.1 plays the outside index: it takes
uploads, redirects, answers without end or not at all.  The pusher is driven
directly over memory storage, and once through the real C{twistd devpi}.
"""

import hashlib
import json
import os
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from devpi_twisted.errors import Unauthorized
from devpi_twisted.model import keys
from devpi_twisted.services.push import (
    CONNECT_TIMEOUT, MAX_REPLY, PUSH_FAILED, PushClient, Pusher, pushClient,
)
from devpi_twisted.services.fileentries import newEntry, writeFileEntry
from devpi_twisted.storage import BlobInfo
from devpi_twisted.storage.readers import BytesReader, ReaderBodyProducer
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage

from .distbuilder import buildWheel, uploadBody
from .helpers import basicAuth
from .releaseharness import ServerHarness, combine
from .serverprocess import Foreground, freePort, tool, waitForAnswer

JSON_HEADERS = {b"Accept": [b"application/json"], b"Content-Type": [b"application/json"]}
WHEEL = "demo_pkg-1.0-py3-none-any.whl"
DATA = b"wheel bytes " * 100


class Receiver(Resource):
    """The outside index: what each path does with a POST, and what it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[str, bytes]] = []
        self.endlessSent = 0
        self.endlessLost: Deferred[None] = Deferred()

    def render_POST(self, request: Any) -> Any:
        path = request.path.decode()
        self.hits.append((path, request.content.read()))
        if path == "/ok":
            return b"thanks"
        if path == "/redirect":
            request.setResponseCode(303)
            request.setHeader(b"Location", b"/landed")
            return b""
        if path == "/landed":
            return b"followed"
        if path == "/endless":
            request.setResponseCode(400, b"Bad Request")
            chunk = b"x" * 65536

            def more() -> None:
                request.write(chunk)
                self.endlessSent += len(chunk)

            writer = LoopingCall(more)
            writer.start(0.001)

            def lost(_: Any) -> None:
                writer.stop()
                self.endlessLost.callback(None)

            request.notifyFinish().addBoth(lost)
            return NOT_DONE_YET
        if path == "/silent":
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b""

    def paths(self) -> list[str]:
        return [path for path, _ in self.hits]


def storeRelease(storage: MemoryStorage, blobs: MemoryBlobStore) -> None:
    """alice/dev with demo-pkg 1.0 and its one wheel."""
    sha = hashlib.sha256(DATA).hexdigest()
    blobs.stored(sha, DATA)

    def write(txn: Any) -> None:
        txn.set(keys.indexKey("alice", "dev"), {"type": "stage", "volatile": True, "bases": []})
        txn.set(keys.projectKey("alice", "dev", "demo-pkg"), {"name": "demo-pkg"})
        txn.set(keys.versionKey("alice", "dev", "demo-pkg", "1.0"), {"name": "demo-pkg", "version": "1.0"})
        writeFileEntry(txn, "alice", "dev", newEntry(
            "alice", "dev", "releasefile", WHEEL, "demo-pkg", "1.0", BlobInfo(sha, len(DATA)), 0.0, []))

    storage.write(write)


class _ReceiverCase(TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        self.receiver = Receiver()
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.receiver))

        def listening(port: Any) -> None:
            self.addCleanup(port.stopListening)
            self.base = f"http://127.0.0.1:{port.getHost().port}"

        return d.addCallback(listening)


class ExternalPushTests(_ReceiverCase):
    """The pusher over memory storage, with the real HTTP client against the receiver."""

    def pusher(self, timeout: float = 30.0) -> Pusher:
        storage, blobs = MemoryStorage(), MemoryBlobStore()
        storeRelease(storage, blobs)
        return Pusher(storage, blobs, None, pushClient(reactor, timeout=timeout))

    async def push(self, path: str, requester: str | None = "alice", timeout: float = 30.0,
                   url: str | None = None) -> tuple[int, list[Any]]:
        body = {"name": "demo-pkg", "version": "1.0", "posturl": url or self.base + path,
                "username": "u", "password": "p"}
        return await self.pusher(timeout).push(requester, "alice", "dev", body)

    def assertGeneric(self, result: tuple[int, list[Any]], port: int) -> None:
        """502, and an upload action that says only L{PUSH_FAILED}."""
        status, actions = result
        self.assertEqual(status, 502)
        self.assertEqual(actions, [[-1, "upload", actions[0][2], PUSH_FAILED]])
        text = json.dumps(actions).lower()
        for detail in ("127.0.0.1", str(port), "refused", "errno", "timeout", "timed out", "connect"):
            self.assertNotIn(detail, text)

    async def test_happyPath(self) -> None:
        """The file and its form fields reach the receiver, and the push reports 200."""
        status, actions = await self.push("/ok")
        self.assertEqual((status, actions[0][0], actions[0][3]), (200, 200, ""))
        self.assertEqual(self.receiver.paths(), ["/ok"])
        body = self.receiver.hits[0][1]
        self.assertIn(DATA, body)
        self.assertIn(b'name=":action"\r\n\r\nfile_upload', body)

    async def test_anonymousRefused(self) -> None:
        """Without a user the push is refused (401) before anything is sent."""
        with self.assertRaises(Unauthorized):
            await self.push("/ok", requester=None)
        self.assertEqual(self.receiver.hits, [])

    async def test_redirectNotFollowed(self) -> None:
        """A 303 is the answer: nothing is sent where it points."""
        status, actions = await self.push("/redirect")
        self.assertEqual(status, 502)
        self.assertEqual(actions[0][0], 303)
        self.assertEqual(self.receiver.paths(), ["/redirect"])

    async def test_endlessReplyCut(self) -> None:
        """A reply that never ends is read only to its limit; the connection is dropped and the push ends."""
        started = time.monotonic()
        status, actions = await self.push("/endless")
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual((status, actions[0][0]), (502, 400))
        self.assertEqual(actions[0][3], "HTTP 400 Bad Request")
        await self.receiver.endlessLost

    async def test_connectionRefused(self) -> None:
        """Nobody listening: the generic message, not the network error."""
        port = freePort()
        self.assertGeneric(await self.push("", url=f"http://127.0.0.1:{port}/"), port)

    async def test_noAnswerTimesOut(self) -> None:
        """A receiver that never answers: the push ends at its deadline, with the generic message."""
        started = time.monotonic()
        result = await self.push("/silent", timeout=0.5)
        self.assertLess(time.monotonic() - started, 10)
        self.assertGeneric(result, int(self.base.rsplit(":", 1)[1]))
        self.assertEqual(self.receiver.paths(), ["/silent"])


class _FakeResponse:
    """Delivers C{size} bytes in 4 KB pieces while its reader's transport keeps producing."""

    code = 400
    phrase = b"Bad\x00 Request"

    def __init__(self, size: int) -> None:
        self.size = size
        self.delivered = 0
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        while self.delivered < self.size and self.transport.producerState == "producing":
            protocol.dataReceived(b"y" * 4096)
            self.delivered += 4096


class _FakeAgent:
    def __init__(self, response: Any) -> None:
        self.response = response
        self.requests: list[Any] = []

    def request(self, method: bytes, url: bytes, headers: Any = None, body: Any = None) -> Deferred[Any]:
        self.requests.append((method, url))
        return succeed(self.response) if self.response is not None else Deferred()


class PushClientTests(SynchronousTestCase):
    """The client's limits, with a fake agent and clock."""

    def test_replyReadToLimit(self) -> None:
        """Of a 10 MB reply at most 64 KB are read, then the connection is dropped."""
        response = _FakeResponse(10 * 1024 * 1024)
        client = PushClient(_FakeAgent(response), Clock())
        _, reply = self.successResultOf(client.post(b"http://x/", Headers(), None))
        self.assertEqual(reply, b"y" * MAX_REPLY)
        self.assertEqual(response.transport.producerState, "stopped")
        self.assertLessEqual(response.delivered, MAX_REPLY)

    def test_totalDeadline(self) -> None:
        """A request that gets no answer fails once its deadline passes."""
        clock = Clock()
        d = PushClient(_FakeAgent(None), clock, timeout=7).post(b"http://x/", Headers(), None)
        clock.advance(6.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.failureResultOf(d)

    def test_connectTimeout(self) -> None:
        """The client makeService uses connects with a timeout."""
        memory = MemoryReactorClock()
        pushClient(memory).post(b"http://127.0.0.1:9/", Headers(), None)
        self.assertEqual(memory.tcpClients[0][3], CONNECT_TIMEOUT)


class RealServerPushTests(_ReceiverCase):
    """Through C{twistd devpi}: its push client is the limited one, and anonymous pushes are refused."""

    timeout = 180

    async def test_externalPush(self) -> None:
        tool("twistd")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = freePort()
        url = f"http://127.0.0.1:{port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))
        server = Foreground(self, workdir, "--listen", f"tcp:{port}:interface=127.0.0.1")
        await waitForAnswer(self, http, url + "/+api", server.alive, server.output)

        async def call(method: str, path: str, body: Any, auth: Any) -> tuple[int, Any]:
            response = await http.request(method, url + path, data=json.dumps(body).encode(),
                                          headers={**JSON_HEADERS, **(auth or {})}, timeout=60)
            return response.code, json.loads(await response.content())

        alice = basicAuth("alice", "alicepw")
        self.assertEqual((await call("PUT", "/alice", {"password": "alicepw"}, None))[0], 201)
        self.assertEqual((await call("PUT", "/alice/dev", {}, alice))[0], 200)
        upload = uploadBody(buildWheel("demo-pkg", "1.0"))
        response = await http.post(url + "/alice/dev/", data=upload.body, headers={**upload.headers, **alice})
        self.assertEqual(response.code, 200, await response.content())

        def body(path: str) -> dict[str, str]:
            return {"name": "demo-pkg", "version": "1.0", "posturl": self.base + path,
                    "username": "u", "password": "p"}

        code, answer = await call("PUSH", "/alice/dev", body("/ok"), None)
        self.assertEqual(code, 401, answer)
        self.assertEqual(self.receiver.hits, [])
        code, answer = await call("PUSH", "/alice/dev", body("/redirect"), alice)
        self.assertEqual((code, answer["result"][0][0]), (502, 303))
        self.assertEqual(self.receiver.paths(), ["/redirect"])
        code, answer = await call("PUSH", "/alice/dev", body("/ok"), alice)
        self.assertEqual((code, answer["result"][0][0]), (200, 200), answer)
        self.assertEqual(self.receiver.paths(), ["/redirect", "/ok"])


class PushOverwriteLogTests(SynchronousTestCase):
    """A push over other bytes on a volatile index says so in the file's log, as devpi does."""

    def setUp(self) -> None:
        self.server = ServerHarness(self, rootPypi=False)
        self.server.createIndex("alice", "dev")
        self.server.createIndex("alice", "prod")
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", "1.0"))
        self.server.mustUpload("alice/prod", buildWheel("demo-pkg", "1.0", summary="other bytes"))

    def pushAndLog(self) -> list[dict[str, Any]]:
        answer = self.server.request("PUSH", "/alice/dev", combine(JSON_HEADERS, self.server.alice),
                                     json={"name": "demo-pkg", "version": "1.0", "targetindex": "alice/prod"})
        self.assertEqual(answer.code, 200, answer.body)
        links = self.server.request("GET", "/alice/prod/demo-pkg/1.0", JSON_HEADERS).json["result"]["+links"]
        [link] = [link for link in links if link["rel"] == "releasefile"]
        return link["log"]

    def test_overwriteLogged(self) -> None:
        """overwrite (with its count), the source's upload, then the push."""
        log = self.pushAndLog()
        self.assertEqual([e["what"] for e in log], ["overwrite", "upload", "push"])
        self.assertEqual((log[0]["who"], log[0]["count"]), (None, 1))
        self.assertEqual(len(log[0]["when"]), 6)
        self.assertEqual((log[2]["who"], log[2]["src"], log[2]["dst"]), ("alice", "alice/dev", "alice/prod"))

    def test_countGrows(self) -> None:
        """A second push over other bytes counts two overwrites; the source's own overwrite is not copied."""
        self.pushAndLog()
        self.server.mustUpload("alice/dev", buildWheel("demo-pkg", "1.0", summary="third bytes"))
        log = self.pushAndLog()
        self.assertEqual([e["what"] for e in log], ["overwrite", "upload", "push"])
        self.assertEqual(log[0]["count"], 2)


class _LaterReader:
    """
    An L{IBlobReader} that is not a local file, each of whose reads waits
    until the test answers it: a blob store across the network.
    """

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._data = data
        self._position = 0
        self.pending: list[tuple[Deferred[bytes], int]] = []
        self.reads = 0
        self.closed = False

    def seek(self, offset: int) -> None:
        self._position = offset

    def read(self, size: int) -> Deferred[bytes]:
        self.reads += 1
        d: Deferred[bytes] = Deferred()
        self.pending.append((d, size))
        return d

    def answer(self) -> None:
        d, size = self.pending.pop(0)
        data = self._data[self._position:self._position + size]
        self._position += len(data)
        d.callback(data)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


class Answered:
    """A 200 with an empty body."""

    code = 200
    phrase = b"OK"

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ResponseDone()))


class ReaderBodyProducerTests(SynchronousTestCase):
    """The file part of a push is read through the blob's asynchronous reads, as the connection takes it."""

    def test_readsAsTaken(self) -> None:
        """One read at a time; none while paused; the start's Deferred fires after the last piece."""
        reader, consumer = _LaterReader(b"0123456789"), StringTransport()
        producer = ReaderBodyProducer(reader, pieceSize=4)
        self.assertEqual(producer.length, 10)
        done = producer.startProducing(consumer)
        self.assertEqual((reader.reads, consumer.value()), (1, b""))
        reader.answer()
        self.assertEqual((reader.reads, consumer.value()), (2, b"0123"))
        producer.pauseProducing()
        reader.answer()
        self.assertEqual((reader.reads, consumer.value()), (2, b"01234567"))
        producer.resumeProducing()
        self.assertEqual(reader.reads, 3)
        reader.answer()
        self.assertNoResult(done)
        reader.answer()  # the end
        self.successResultOf(done)
        self.assertEqual(consumer.value(), b"0123456789")
        self.assertEqual(reader.pending, [])

    def test_readerAnsweringAtOnce(self) -> None:
        """A reader whose reads answer at once is read in a loop, not by recursion."""
        data = b"x" * 100_000
        consumer = StringTransport()
        self.successResultOf(ReaderBodyProducer(BytesReader(data), pieceSize=1).startProducing(consumer))
        self.assertEqual(consumer.value(), data)

    def test_stop(self) -> None:
        """After stopProducing nothing more is read or written, and the start's Deferred never fires."""
        reader, consumer = _LaterReader(b"0123456789"), StringTransport()
        producer = ReaderBodyProducer(reader, pieceSize=4)
        done = producer.startProducing(consumer)
        producer.stopProducing()
        reader.answer()
        self.assertEqual((reader.reads, consumer.value()), (1, b""))
        self.assertNoResult(done)

    def test_readFails(self) -> None:
        """A failed read fails the body."""
        reader = _LaterReader(b"0123456789")
        done = ReaderBodyProducer(reader).startProducing(StringTransport())
        reader.pending.pop(0)[0].errback(OSError("gone"))
        self.failureResultOf(done, OSError)

    def test_pushStreamsAStoreElsewhere(self) -> None:
        """
        An outside push of a blob that is not a local file sends it as the
        connection takes it: nothing of it is read (or copied) before the
        request starts, and the reader is closed after the answer.
        """
        storage = MemoryStorage()
        storeRelease(storage, MemoryBlobStore())
        reader = _LaterReader(DATA)

        class Blobs:
            def open(self, sha256: str) -> Deferred[Any]:
                return succeed(reader)

        class Agent:
            def __init__(self) -> None:
                self.bodies: list[Any] = []
                self.answer: Deferred[Any] = Deferred()

            def request(self, method: bytes, url: bytes, headers: Any = None, body: Any = None) -> Deferred[Any]:
                self.bodies.append(body)
                return self.answer

        reactor, agent = MemoryReactorClock(), Agent()
        pusher = Pusher(storage, Blobs(), None, PushClient(agent, reactor))  # type: ignore[arg-type]
        d = Deferred.fromCoroutine(pusher.push("alice", "alice", "dev", {
            "name": "demo-pkg", "version": "1.0", "posturl": "https://upload.example/legacy/",
            "username": "u", "password": "p"}))
        [body] = agent.bodies
        self.assertEqual(reader.reads, 0)
        consumer = StringTransport()
        sent = body.startProducing(consumer)
        for _ in range(100):
            reactor.advance(0)
            while reader.pending:
                reader.answer()
        self.successResultOf(sent)
        self.assertIn(DATA, consumer.value())
        self.assertEqual(body.length, len(consumer.value()))
        self.assertFalse(reader.closed)
        agent.answer.callback(Answered())
        status, _ = self.successResultOf(d)
        self.assertEqual(status, 200)
        self.assertTrue(reader.closed)
