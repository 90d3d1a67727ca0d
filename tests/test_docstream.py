"""
Documentation members are streamed from their zip: read and decompressed a
chunk at a time in the file threads, only as fast as the client takes them,
and closed when the client goes away (issue 11).  Through the real web
resource over memory storage (L{tests.helpers.APIHarness}).
"""

import hashlib
import io
import zipfile
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from devpi_twisted.services.releases import Documentation
from devpi_twisted.storage import doczip
from devpi_twisted.storage.doczip import CHUNK, DocMemberError, DocZipReader
from devpi_twisted.storage.readers import BytesReader, blockingFile

from .distbuilder import buildWheel, uploadBody
from .helpers import APIHarness, basicAuth, merge

BIG = 50 * 1024 * 1024
BIG_PATH = "/alice/dev/bigdocs/1.0/+doc/big.html"
_zips: dict[str, bytes] = {}


def bigZip() -> bytes:
    """50 MiB of zeros in a zip of about 50 KB (built once: deflating takes a moment)."""
    if "big" not in _zips:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("index.html", b"<p>small</p>")
            with z.open("big.html", "w", force_zip64=False) as member:
                block = b"\0" * (1024 * 1024)
                for _ in range(BIG // len(block)):
                    member.write(block)
        _zips["big"] = out.getvalue()
    return _zips["big"]


class RecordingRunner:
    """
    A C{runFile} that runs each callable inline, recording its name and
    marking the time it runs (C{active}): what runs inside it stands for what
    the file threads do.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.active = False

    def __call__(self, f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        self.calls.append(getattr(f, "__name__", repr(f)))
        self.active = True
        try:
            return maybeDeferred(f, *args)
        finally:
            self.active = False

    def count(self, name: str) -> int:
        return self.calls.count(name)


def recordZipFiles(testCase: SynchronousTestCase) -> list[Any]:
    """Every blocking file the documentation zips are read from, kept in the list returned."""
    files: list[Any] = []

    async def recording(reader: Any, runFile: Any) -> Any:
        file = await blockingFile(reader, runFile)
        files.append(file)
        return file

    testCase.patch(doczip, "blockingFile", recording)
    return files


class DocHarness(APIHarness):
    """L{APIHarness} with a recording file runner and blob store, holding one big documentation zip."""

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.runner = RecordingRunner()
        self.zipFiles = recordZipFiles(testCase)
        super().__init__(testCase)
        self.createUser("alice")
        self.createIndex("alice", "dev")
        # Stored as an older server or an import may have stored it: the
        # upload's ratio check would refuse so well compressed a member.
        self.storeDoc("bigdocs", bigZip())

    def storeDoc(self, project: str, data: bytes) -> None:
        """Store C{data} as the documentation of C{project} 1.0 in alice/dev, bypassing the upload's checks."""
        writer = self.blobs.openWriter()
        self.testCase.successResultOf(writer.write(data))
        info = self.testCase.successResultOf(writer.commit())
        self.testCase.successResultOf(Documentation(self.storage, self.clock.seconds).storeDoc(
            "alice", "alice", "dev", project, project, "1.0", info))
        self.runner.calls.clear()

    def checkCommon(self, answer: Any) -> None:
        """The common checks, but a documentation page is no JSON."""
        if answer.code == 200 and answer.header("Content-Type") != "application/json":
            answer = replace(answer, body=b"")
        super().checkCommon(answer)

    def collaborators(self) -> dict[str, Any]:
        parts = super().collaborators()
        parts["runner"].runFile = self.runner
        return parts


class StallingTransport(StringTransport):
    """
    A connection whose peer reads nothing: like a socket's transport, it
    pauses its producer on every write once more than C{bufferSize} bytes
    wait, until the test takes them (L{drain}).
    """

    bufferSize = 64 * 1024

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.bufferSize:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer reads everything waiting; the transport asks for more."""
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def connect(harness: DocHarness) -> tuple[Any, StallingTransport]:
    """An HTTP connection to the harness's resource over a L{StallingTransport}."""
    channel = Site(harness.resource).buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    transport = StallingTransport()
    channel.makeConnection(transport)
    return channel, transport


class DocStreamTests(SynchronousTestCase):
    """Documentation pages stream out of their zip with flow control."""

    def setUp(self) -> None:
        self.server = DocHarness(self)

    def test_bytesCorrect(self) -> None:
        """A 50 MiB member arrives whole and exact, with its type and the docs' CSP."""
        answer = self.server.get(BIG_PATH)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), "text/html")
        self.assertIn("sandbox", answer.header("Content-Security-Policy") or "")
        self.assertEqual(len(answer.body), BIG)
        self.assertEqual(hashlib.sha256(answer.body).digest(), hashlib.sha256(b"\0" * BIG).digest())
        self.assertTrue(self.server.zipFiles[-1].closed)
        # treq follows the redirect to index.html.
        self.assertEqual(self.server.get("/alice/dev/bigdocs/1.0/+doc/").body, b"<p>small</p>")
        self.assertEqual(self.server.get("/alice/dev/bigdocs/1.0/+doc/index.html").body, b"<p>small</p>")
        self.assertEqual(self.server.get("/alice/dev/bigdocs/1.0/+doc/nothing.html").code, 404)

    def test_head(self) -> None:
        """HEAD gives the member's length and no body, reads no member data and closes the zip."""
        answer = self.server.request("HEAD", BIG_PATH)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Length"), str(BIG))
        self.assertEqual(answer.body, b"")
        self.assertEqual(self.server.runner.count("_read"), 0)
        self.assertTrue(self.server.zipFiles[-1].closed)

    def test_readInRunner(self) -> None:
        """The zip's directory and every chunk are read and decompressed inside the file runner."""
        seen: list[tuple[str, bool]] = []
        runner = self.server.runner

        def spy(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                seen.append((name, runner.active))
                return original(*args, **kwargs)
            return wrapper

        self.patch(zipfile.ZipFile, "_RealGetContents", spy("directory", zipfile.ZipFile._RealGetContents))
        self.patch(zipfile.ZipExtFile, "read", spy("read", zipfile.ZipExtFile.read))
        answer = self.server.get(BIG_PATH)
        self.assertEqual(len(answer.body), BIG)
        self.assertIn(("directory", True), seen)
        self.assertGreaterEqual(seen.count(("read", True)), BIG // CHUNK)
        self.assertEqual([entry for entry in seen if not entry[1]], [])

    def test_pausedConsumerReadsBoundedChunks(self) -> None:
        """A client that reads nothing costs a few chunks; each drain of its buffer reads a few more."""
        channel, transport = connect(self.server)
        channel.dataReceived(f"GET {BIG_PATH} HTTP/1.1\r\nHost: devpi.test\r\n\r\n".encode())
        reads = self.server.runner.count("_read")
        self.assertGreater(reads, 0)
        self.assertLessEqual(reads, 3)
        self.assertLessEqual(len(transport.value()), 3 * CHUNK)
        received = transport.drain()
        self.assertIn(b"Content-Length: %d" % BIG, received)
        for _ in range(5):
            before = self.server.runner.count("_read")
            received += transport.drain()
            self.assertLessEqual(self.server.runner.count("_read") - before, 3)
        self.assertFalse(self.server.zipFiles[-1].closed)
        channel.connectionLost(Failure(ConnectionDone()))

    def test_disconnectClosesZip(self) -> None:
        """A client that goes away mid-stream stops the reading and closes the zip."""
        channel, transport = connect(self.server)
        channel.dataReceived(f"GET {BIG_PATH} HTTP/1.1\r\nHost: devpi.test\r\n\r\n".encode())
        transport.drain()
        file = self.server.zipFiles[-1]
        self.assertFalse(file.closed)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(file.closed)
        reads = self.server.runner.count("_read")
        transport.drain()
        self.assertEqual(self.server.runner.count("_read"), reads)

    def test_damagedMemberCutsConnection(self) -> None:
        """A member whose data fails its check cuts the connection: never a short body taken as whole."""
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            z.writestr("page.html", b"A" * (4 * CHUNK + 10))
        self.server.storeDoc("broken", out.getvalue().replace(b"A" * 16, b"B" * 16, 1))
        channel, transport = connect(self.server)
        channel.dataReceived(b"GET /alice/dev/broken/1.0/+doc/page.html HTTP/1.1\r\nHost: devpi.test\r\n\r\n")
        received = b""
        for _ in range(10):
            received += transport.drain()
        self.assertIn(b"Content-Length: %d" % (4 * CHUNK + 10), received)
        self.assertTrue(transport.disconnected)
        self.assertLess(len(received.split(b"\r\n\r\n", 1)[1]), 4 * CHUNK + 10)
        self.assertTrue(self.server.zipFiles[-1].closed)
        self.assertEqual(len(self.flushLoggedErrors(DocMemberError)), 1)

    def test_toxresultReadInRunner(self) -> None:
        """A posted tox result is read and parsed by the file runner, not on the reactor."""
        upload = uploadBody(buildWheel("demo-pkg", "1.0"))
        answer = self.server.request("POST", "/alice/dev/", body=upload.body,
                                     headers=merge(upload.headers, basicAuth("alice", "secret")))
        self.assertEqual(answer.code, 200, answer.body)
        links = self.server.get("/alice/dev/demo-pkg/1.0").json["result"]["+links"]
        url = "/" + next(link["href"] for link in links if link["rel"] == "releasefile").split("/", 3)[3]
        self.server.runner.calls.clear()
        answer = self.server.post(url, json={"testenvs": {}}, headers=basicAuth("alice", "secret"))
        self.assertEqual(answer.code, 200, answer.body)
        self.assertIn("_readToxresult", self.server.runner.calls)
        bad = self.server.post(url, body=b"{nope", headers=basicAuth("alice", "secret"))
        self.assertEqual(bad.code, 400)


class QueuedRunner:
    """A C{runFile} whose calls wait until the test runs them, as a busy thread pool would."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], "Deferred[Any]"]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        d: "Deferred[Any]" = Deferred()
        self.queue.append((f, args, d))
        return d

    def runAll(self) -> None:
        while self.queue:
            f, args, d = self.queue.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


class DocZipReaderTests(SynchronousTestCase):
    """L{DocZipReader} on its own, with file work that finishes later."""

    def test_cancelledOpenClosesZip(self) -> None:
        """A client gone while the zip's directory is read: the member is closed when it arrives."""
        runner = QueuedRunner()
        files = recordZipFiles(self)
        opening = DocZipReader(runner).openMember(BytesReader(bigZip()), "index.html")
        opening.cancel()
        self.failureResultOf(opening, CancelledError)
        runner.runAll()
        self.assertTrue(files[0].closed)

    def test_closeWaitsForRead(self) -> None:
        """Closing while a chunk is being read closes only after that read, never beside it."""
        runner = QueuedRunner()
        files = recordZipFiles(self)
        opening = DocZipReader(runner).openMember(BytesReader(bigZip()), "big.html")
        runner.runAll()
        [file] = files
        member = self.successResultOf(opening)
        reading = member.read()
        member.close()
        self.assertEqual([f.__name__ for f, _, _ in runner.queue], ["_read"])
        runner.runAll()
        self.assertEqual(len(self.successResultOf(reading)), CHUNK)
        self.assertTrue(file.closed)
