"""
Serving stored files over real loopback connections: the bytes that arrive
are the file's, whether they went with sendfile(2), through the transport,
or both; fast and slow clients, ranges, keep-alive, TLS, disconnects and
files that end early.
"""

import errno
import hashlib
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from devpi_twisted.storage.blobs import FileBlobReader
from devpi_twisted.storage.readers import BytesReader
from devpi_twisted.storage.threads import ThreadRunner
from devpi_twisted.web.files import SENDFILE_SLICE, directSocket, serveBytesOrFile

from .certs import CA

SIZE = 6 * 1024 * 1024 + 12345
ETAG = b'"test-etag"'


class CountingSendfile:
    """os.sendfile, counting the bytes it sent and how often the socket was full."""

    def __init__(self, fail: OSError | None = None) -> None:
        self.sent = 0
        self.calls = 0
        self.largestAsk = 0
        self.socketFull = 0
        self._fail = fail

    def __call__(self, out: int, inp: int, offset: int, count: int) -> int:
        self.calls += 1
        self.largestAsk = max(self.largestAsk, count)
        if self._fail is not None:
            raise self._fail
        try:
            sent = os.sendfile(out, inp, offset, count)
        except BlockingIOError:
            self.socketFull += 1
            raise
        self.sent += sent
        return sent


class TrackedFile(FileBlobReader):
    """A stored file (read in a real thread pool) that remembers it was closed."""

    closedCount = 0

    def _release(self) -> None:
        if self._fd is not None:
            TrackedFile.closedCount += 1
        super()._release()


def openTracked(path: str, runner: Any) -> TrackedFile:
    fd = os.open(path, os.O_RDONLY)
    return TrackedFile(fd, os.fstat(fd).st_size, runner)


class RemoteFile(BytesReader):
    """A blob whose reads answer later, as a blob store across the network would."""

    reads = 0

    def __init__(self, data: bytes) -> None:
        def later(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            RemoteFile.reads += 1
            return deferLater(reactor, 0.0, f, *args)

        super().__init__(data, later)


class OneFile(Resource):
    isLeaf = True

    def __init__(self, path: str, size: int, sendfile: Callable | None, runner: Any) -> None:
        super().__init__()
        self.runner = runner
        self.path = path
        self.size = size
        self.sendfile = sendfile
        self.finished: list[int] = []

    def render(self, request: Any) -> Any:
        request.notifyFinish().addBoth(lambda _: self.finished.append(request.sentLength))
        return serveBytesOrFile(request, file=self.open(), size=self.size, filename="f.whl",
                                etag=ETAG, lastModified=None, sendfile=self.sendfile)

    def open(self) -> Any:
        return openTracked(self.path, self.runner)


class OneRemoteFile(OneFile):
    def open(self) -> Any:
        with open(self.path, "rb") as f:
            return RemoteFile(f.read())


class LateFile(OneFile):
    """Answers only after the client had time to go away, as a slow lookup would."""

    def render(self, request: Any) -> Any:
        def late() -> None:
            result = OneFile.render(self, request)
            self.lateResult.callback(result)

        self.lateResult: Deferred[Any] = Deferred()
        reactor.callLater(0.2, late)
        return NOT_DONE_YET


class RawClient(Protocol):
    """
    Sends one prepared request and keeps every byte of the answer until the
    server closes; with C{stallEvery} it stops reading for a moment after that
    many bytes, so the server's socket fills up.
    """

    def __init__(self, request: bytes, stallEvery: int = 0, dropAfter: int = 0, dropAtOnce: bool = False) -> None:
        self.request = request
        self.stallEvery = stallEvery
        self.dropAfter = dropAfter
        self.dropAtOnce = dropAtOnce
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()
        self._sinceStall = 0

    def connectionMade(self) -> None:
        if self.stallEvery:
            self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.transport.write(self.request)
        if self.dropAtOnce:
            reactor.callLater(0.05, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.dropAfter and len(self.received) >= self.dropAfter:
            self.transport.abortConnection()
            return
        self._sinceStall += len(data)
        if self.stallEvery and self._sinceStall >= self.stallEvery:
            self._sinceStall = 0
            self.transport.pauseProducing()
            reactor.callLater(0.002, self.transport.resumeProducing)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.received))


def splitResponses(data: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Status line, headers and body of each answer in C{data}, by Content-Length."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = int(headers[b"content-length"])
        answers.append((lines[0], headers, rest[:length]))
        data = rest[length:]
    return answers


def get(path: bytes = b"/", extra: bytes = b"", close: bool = True) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + connection + extra + b"\r\n"


class ServeFileTests(TestCase):
    def setUp(self) -> Deferred:
        self.content = os.urandom(SIZE)
        self.path = self.mktemp()
        with open(self.path, "wb") as f:
            f.write(self.content)
        TrackedFile.closedCount = 0
        RemoteFile.reads = 0
        self.runner = ThreadRunner(reactor)
        self.runner.start()
        self.addCleanup(self.runner.stopService)
        return self.listen(CountingSendfile())

    def listen(self, sendfile: Callable | None, size: int = SIZE, tls: Any = None, kind: type = OneFile) -> Deferred:
        self.sendfile = sendfile
        self.resource = kind(self.path, size, sendfile, self.runner)
        site = Site(self.resource)
        if tls is not None:
            endpoint = SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1")
        else:
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(port.stopListening)

        return endpoint.listen(site).addCallback(listening)

    async def fetch(self, request: bytes, wrap: Callable | None = None, **clientArgs: Any) -> bytes:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        if wrap is not None:
            endpoint = wrap(endpoint)
        client = RawClient(request, **clientArgs)
        await endpoint.connect(Factory.forProtocol(lambda: client))
        return await client.done

    def assertWhole(self, data: bytes) -> None:
        [(status, headers, body)] = splitResponses(data)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(len(body), SIZE)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(self.content).hexdigest())

    async def test_plainSocketSendsWithSendfile(self) -> None:
        """Nearly every byte goes with sendfile; the access log still counts them all."""
        self.assertWhole(await self.fetch(get()))
        self.assertGreater(self.sendfile.sent, SIZE * 0.9)
        # A fast client never gets more than a slice per turn of the reactor.
        self.assertEqual(self.sendfile.largestAsk, SENDFILE_SLICE)
        self.assertEqual(self.resource.finished, [SIZE])
        self.assertEqual(TrackedFile.closedCount, 1)

    async def test_slowClientGetsEveryByteInOrder(self) -> None:
        """A client that keeps stalling fills the socket; the handoffs through the transport keep the order."""
        self.assertWhole(await self.fetch(get(), stallEvery=256 * 1024))
        self.assertGreater(self.sendfile.socketFull, 0)
        self.assertGreater(self.sendfile.sent, 0)
        self.assertEqual(self.resource.finished, [SIZE])

    async def test_rangeStartsAtItsOffset(self) -> None:
        data = await self.fetch(get(extra=b"Range: bytes=1000000-5000000\r\n"))
        [(status, headers, body)] = splitResponses(data)
        self.assertEqual(status, b"HTTP/1.1 206 Partial Content")
        self.assertEqual(headers[b"content-range"], b"bytes 1000000-5000000/%d" % SIZE)
        self.assertEqual(body, self.content[1000000:5000001])
        self.assertGreater(self.sendfile.sent, 0)

    async def test_keepAliveAnswersFollowInOrder(self) -> None:
        """Two pipelined requests on one connection: the second answer starts right after the first."""
        data = await self.fetch(get(close=False) + get(extra=b"Range: bytes=-100\r\n"))
        [(status1, _, body1), (status2, _, body2)] = splitResponses(data)
        self.assertEqual((status1, body1), (b"HTTP/1.1 200 OK", self.content))
        self.assertEqual((status2, body2), (b"HTTP/1.1 206 Partial Content", self.content[-100:]))
        self.assertEqual(TrackedFile.closedCount, 2)

    async def test_withoutSendfile(self) -> None:
        self.port.stopListening()
        await self.listen(None)
        self.assertWhole(await self.fetch(get(), stallEvery=512 * 1024))

    async def test_fileSystemWithoutSendfile(self) -> None:
        """sendfile refusing the file (EINVAL, as on some FUSE file systems) means plain writes."""
        self.port.stopListening()
        await self.listen(CountingSendfile(fail=OSError(errno.EINVAL, "Invalid argument")))
        self.assertWhole(await self.fetch(get()))
        self.assertEqual(self.sendfile.calls, 1)

    async def test_clientGoneClosesTheFile(self) -> None:
        data = await self.fetch(get(), dropAfter=1024 * 1024)
        self.assertLess(len(data), SIZE)
        # The server learns of the reset on its next write or read.
        for _ in range(100):
            if TrackedFile.closedCount:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(TrackedFile.closedCount, 1)

    async def test_clientGoneBeforeTheAnswer(self) -> None:
        """A client that left while its file was looked up: the file is closed, nothing fails."""
        self.port.stopListening()
        await self.listen(CountingSendfile())
        self.resource = LateFile(self.path, SIZE, self.sendfile, self.runner)
        self.port.factory.resource = self.resource
        data = await self.fetch(get(), dropAtOnce=True)
        self.assertEqual(data, b"")
        self.assertIs(await self.resource.lateResult, NOT_DONE_YET)
        self.assertEqual(TrackedFile.closedCount, 1)
        self.assertEqual(self.sendfile.calls, 0)

    async def test_storedFileShorterThanRecordedAborts(self) -> None:
        """A file cut short on disk never passes as whole: the client sees fewer bytes than announced."""
        for sendfile in (CountingSendfile(), None):
            self.port.stopListening()
            await self.listen(sendfile, size=SIZE + 1000)
            data = await self.fetch(get())
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertIn(b"Content-Length: %d" % (SIZE + 1000), head)
            self.assertLess(len(body), SIZE + 1000)
            self.assertEqual(body, self.content[:len(body)])

    async def test_blobElsewhereIsReadAsynchronously(self) -> None:
        """
        A blob that is not a local file (a store across the network) is sent
        with its asynchronous reads, even on a plain socket, to a fast or a
        stalling client, and a short one is still cut off.
        """
        for stallEvery in (0, 256 * 1024):
            self.port.stopListening()
            await self.listen(CountingSendfile(), kind=OneRemoteFile)
            self.assertWhole(await self.fetch(get(), stallEvery=stallEvery))
            self.assertEqual(self.sendfile.calls, 0)
        self.assertGreater(RemoteFile.reads, SIZE // (256 * 1024))
        self.port.stopListening()
        await self.listen(CountingSendfile(), size=SIZE + 1000, kind=OneRemoteFile)
        head, _, body = (await self.fetch(get())).partition(b"\r\n\r\n")
        self.assertLess(len(body), SIZE + 1000)

    async def test_tlsNeverUsesSendfile(self) -> None:
        ca = CA()
        issued = ca.issue(["localhost"], ["127.0.0.1"])
        server = PrivateCertificate.loadPEM(issued.key + issued.certificate).options()
        self.port.stopListening()
        await self.listen(CountingSendfile(), tls=server)
        trust = Certificate.loadPEM(ca.pem)
        data = await self.fetch(get(), wrap=lambda e: wrapClientTLS(optionsForClientTLS("127.0.0.1", trust), e))
        self.assertWhole(data)
        self.assertEqual(self.sendfile.calls, 0)


class DirectSocketTests(TestCase):
    def test_plainTransport(self) -> None:
        sock = socket.socket()
        self.addCleanup(sock.close)

        class Plain:
            def getHandle(self) -> socket.socket:
                return sock

        self.assertIs(directSocket(Plain()), sock)

    def test_noHandle(self) -> None:
        self.assertIsNone(directSocket(object()))

    def test_handleThatIsNotASocket(self) -> None:
        class Wrapped:
            def getHandle(self) -> object:
                return object()

        self.assertIsNone(directSocket(Wrapped()))
