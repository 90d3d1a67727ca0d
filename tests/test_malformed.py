"""
Malformed requests get a 4xx with a JSON message and leave no traceback in
the log; redirects stay on this server; a full disk is 507.

The request-level tests drive the real routes through a L{DevpiSite} with
raw bytes (L{tests.test_ops.Connection}), since what is malformed is often
what an HTTP client library would refuse to send.
"""

import errno
import json
import sqlite3
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.errors import InsufficientStorage
from devpi_twisted.storage.sqlite import SqliteStorage
from devpi_twisted.storage.threads import SynchronousRunner
from devpi_twisted.web.context import _baseURL
from devpi_twisted.web.headers import METHODS, isValidHost
from devpi_twisted.web.limits import limitedRequestFactory
from devpi_twisted.web.responses import localLocation
from devpi_twisted.web.routes import Routes
from devpi_twisted.web.server import DevpiRequest, DevpiSite, SiteLimits

from .distbuilder import buildWheel
from .helpers import APIHarness
from .releaseharness import ServerHarness
from .test_ops import PEER, Connection

DISK_FULL = "the server's disk is full; nothing was stored"


class _LoggedErrors:
    """Collects the log events at error level or above (where tracebacks go) during a test."""

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        testCase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or (level is not None and level >= LogLevel.error) or event.get("isError"):
            self.events.append(event)


class MalformedHeadTests(SynchronousTestCase):
    """Each case the fuzzer found: a clear 4xx, a JSON message, nothing logged as an error."""

    def setUp(self) -> None:
        self.errors = _LoggedErrors(self)
        harness = APIHarness(self)
        harness.createUser("alice")
        harness.createIndex("alice", "dev")
        request = limitedRequestFactory(1000, [], base=DevpiRequest)
        self.site = DevpiSite(harness.resource, Clock(), SiteLimits(), request, [])
        self.connections: list[Connection] = []
        self.addCleanup(lambda: [c.close() for c in self.connections])

    def answer(self, raw: bytes) -> tuple[int, dict[bytes, bytes], Any]:
        connection = Connection(self.site)
        self.connections.append(connection)
        connection.send(raw)
        responses = connection.responses()
        self.assertEqual(len(responses), 1, connection.transport.value())
        status, headers, body = responses[0]
        self.assertEqual(self.errors.events, [])
        if status >= 400 and not raw.startswith(b"HEAD "):
            self.assertEqual(headers[b"content-type"], b"application/json")
            message = json.loads(body)["message"]
            self.assertIsInstance(message, str)
            return status, headers, message
        return status, headers, body

    def test_hostLabelOver63(self) -> None:
        """A Host label over 63 characters (which IDNA cannot encode) is 400, not a 500."""
        status, _, message = self.answer(b"GET /+api HTTP/1.1\r\nHost: " + b"a" * 64 + b".example\r\n\r\n")
        self.assertEqual((status, message), (400, "the Host header is not a valid host name"))

    def test_hostNotUTF8(self) -> None:
        """A Host that is not UTF-8 is 400 with a JSON message and no traceback in the log."""
        status, _, message = self.answer(b"GET /alice/dev/+simple/ HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n")
        self.assertEqual((status, message), (400, "the Host header is not a valid host name"))

    def test_twoHosts(self) -> None:
        """Two Host headers are 400 (RFC 9112 section 3.2)."""
        status, _, message = self.answer(b"GET /+api HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n")
        self.assertEqual((status, message), (400, "more than one Host header"))

    def test_lowercaseMethod(self) -> None:
        """Methods are case-sensitive: C{get} is no method of this server, 405 with the ones it has."""
        for path in (b"/+api", b"/alice/", b"/alice/dev"):
            status, headers, message = self.answer(b"get " + path + b" HTTP/1.1\r\nHost: devpi.test\r\n\r\n")
            self.assertEqual(status, 405)
            self.assertIn("the method get is not supported", message)
            self.assertIn(b"GET", headers[b"allow"].split(b", "))

    def test_outsideURLUnparsable(self) -> None:
        """C{X-Outside-Url: http://[::1}, even from a trusted proxy, is ignored: the answer uses the request's own host."""
        self.site.limits = SiteLimits(trustedProxies=frozenset([PEER]))
        status, _, body = self.answer(
            b"GET /+api HTTP/1.1\r\nHost: devpi.test\r\nAccept: application/json\r\n"
            b"X-Outside-Url: http://[::1\r\n\r\n")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["result"]["login"], "http://devpi.test/+login")

    def test_headerLineOverLimit(self) -> None:
        """A header line over --max-header-size is 400 with a message, not a silently closed connection."""
        connection = Connection(self.site)
        self.connections.append(connection)
        connection.send(b"GET /+api HTTP/1.1\r\nHost: devpi.test\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        [(status, headers, body)] = connection.responses()
        self.assertEqual(status, 400)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertIn("longer than the limit of 16384 bytes (--max-header-size)", json.loads(body)["message"])
        self.assertTrue(connection.transport.disconnecting)

    def test_headerLineWithinLargerLimit(self) -> None:
        """With a larger --max-header-size, a header line longer than Twisted's own 16384 bytes is fine."""
        request = limitedRequestFactory(1000, [], base=DevpiRequest)
        self.site = DevpiSite(self.site.resource, Clock(), SiteLimits(maxHeaderSize=65536), request, [])
        status, _, _ = self.answer(b"GET /+api HTTP/1.1\r\nHost: devpi.test\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertEqual(status, 200)

    def test_badHeaderLine(self) -> None:
        """Twisted's own bare 400s (a header without a colon, here) carry a JSON message too."""
        connection = Connection(self.site)
        self.connections.append(connection)
        connection.send(b"GET /+api HTTP/1.1\r\nHost: devpi.test\r\nno colon here\r\n\r\n")
        [(status, headers, body)] = connection.responses()
        self.assertEqual(status, 400)
        self.assertIn("malformed request", json.loads(body)["message"])

    def test_tooManyHeaders(self) -> None:
        """More header lines than allowed: 400 that says so."""
        connection = Connection(self.site)
        self.connections.append(connection)
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
        connection.send(b"GET /+api HTTP/1.1\r\nHost: devpi.test\r\n" + many + b"\r\n")
        [(status, _, body)] = connection.responses()
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["message"], "the request has more than 100 header lines")

    def test_doubleSlashRedirectStaysHere(self) -> None:
        """C{//evil.example/...} redirects to a path on this server, never to another host."""
        for path in (b"//evil.example/dev/+simple/Six/", b"//evil.example/dev/+simple/Six",
                     b"/\\evil.example/dev/+simple/Six/"):
            connection = Connection(self.site)
            self.connections.append(connection)
            connection.get(path, b"Accept: text/html\r\n")
            [(status, headers, _)] = connection.responses()
            self.assertIn(status, (301, 302, 308))
            location = headers[b"location"]
            self.assertTrue(location.startswith(b"/") and not location.startswith((b"//", b"/\\")), location)

    def test_methodsCoverRoutes(self) -> None:
        """Every method a route serves passes the head check."""
        routed = {method.encode("ascii") for rule in Routes.app.url_map.iter_rules() for method in rule.methods}
        self.assertLessEqual(routed, METHODS)


class HostAndLocationTests(SynchronousTestCase):
    """The small functions behind the checks."""

    def test_validHosts(self) -> None:
        for host in (b"devpi.test", b"localhost:3141", b"127.0.0.1", b"[::1]:3141", b"[::1]", b"a" * 63 + b".b",
                     b"example.com.", b"under_score.test", b"host:"):
            self.assertTrue(isValidHost(host), host)

    def test_invalidHosts(self) -> None:
        for host in (b"", b"a" * 64, b"a..b", b".a", b"a b", b"\xff", b"\xc3\xa9.test", b"x:abc", b"[::1",
                     b"x:123456", b"a@b", b"%41", b"a/b", b".".join([b"a" * 63] * 5)):
            self.assertFalse(isValidHost(host), host)

    def test_localLocation(self) -> None:
        self.assertEqual(localLocation("//evil.example/x/"), "/evil.example/x/")
        self.assertEqual(localLocation("/\\evil.example/x/"), "/evil.example/x/")
        self.assertEqual(localLocation("http://evil.example/x/"), "/evil.example/x/")
        self.assertEqual(localLocation("/root/dev/+simple/six/"), "/root/dev/+simple/six/")

    def test_outsideURLValues(self) -> None:
        """Only an http(s) base URL with a valid host is taken from X-Outside-Url (whose sender is checked apart)."""
        self.assertEqual(_baseURL(b"https://proxy.test/prefix/"), "https://proxy.test/prefix")
        for bad in (b"http://[::1", b"http://x:notaport/", b"ftp://x/", b"http://\xff/", b"http://user@evil/",
                    b"http://" + b"a" * 64 + b"/"):
            self.assertIsNone(_baseURL(bad), bad)


class DiskFullTests(SynchronousTestCase):
    """A write that finds the disk full is 507 with a message that says so, and works once there is space."""

    def test_uploadBlobWriteENOSPC(self) -> None:
        harness = ServerHarness(self, rootPypi=False)
        errors = _LoggedErrors(self)
        harness.createIndex("alice", "dev")
        openWriter = harness.blobs.openWriter
        full = [True]

        def writerOnFullDisk(*args: Any, **kwargs: Any) -> Any:
            writer = openWriter(*args, **kwargs)
            write = writer.write
            writer.write = lambda data: (  # type: ignore[method-assign]
                fail(OSError(errno.ENOSPC, "No space left on device")) if full[0] else write(data))
            return writer

        harness.blobs.openWriter = writerOnFullDisk  # type: ignore[method-assign]
        serial = harness.storage.currentSerial()
        answer = harness.upload("alice/dev", buildWheel("demo-pkg", "1.0"))
        self.assertEqual(answer.code, 507, answer.body)
        self.assertEqual(json.loads(answer.body)["message"], DISK_FULL)
        self.assertEqual(harness.storage.currentSerial(), serial)
        # One line for the operator, no traceback.
        self.assertEqual([e.get("log_format") for e in errors.events],
                         ["disk full: {method} {path} stored nothing ({cause})"])
        self.assertNotIn("log_failure", errors.events[0])

        full[0] = False
        self.assertEqual(harness.upload("alice/dev", buildWheel("demo-pkg", "1.0")).code, 200)

    def test_sqliteFull(self) -> None:
        """SQLite's "database or disk is full" becomes L{InsufficientStorage}; later writes work."""
        storage = SqliteStorage(FilePath(self.mktemp()), SynchronousRunner())
        self.successResultOf(storage.write(lambda txn: txn.set("a", "x")))
        pages = storage._conn().execute("PRAGMA page_count").fetchone()[0]
        storage._conn().execute(f"PRAGMA max_page_count = {pages + 1}")
        failure = self.failureResultOf(storage.write(lambda txn: txn.set("big", "x" * 1_000_000)),
                                       InsufficientStorage)
        self.assertIsInstance(failure.value.__cause__, sqlite3.OperationalError)
        self.assertEqual(failure.value.status, 507)
        storage._conn().execute("PRAGMA max_page_count = 1073741823")
        serial, _ = self.successResultOf(storage.write(lambda txn: txn.set("big", "x" * 1_000_000)))
        self.assertEqual(serial, 1)
        self.successResultOf(storage.close())


class SpoolDiskFullTests(SynchronousTestCase):
    """A body that cannot be spooled because the disk is full is 507, before any view runs."""

    def test_spoolWriteENOSPC(self) -> None:
        import devpi_twisted.web.limits as limits

        class FullFile:
            def write(self, data: bytes) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self) -> None:
                pass

        self.patch(limits.tempfile, "TemporaryFile", lambda dir=None: FullFile())
        errors = _LoggedErrors(self)
        harness = APIHarness(self)
        request = limitedRequestFactory(10 ** 9, [], base=DevpiRequest, spoolDirectory=self.mktemp())
        site = DevpiSite(harness.resource, Clock(), SiteLimits(), request, [])
        connection = Connection(site)
        self.addCleanup(connection.close)
        connection.send(b"POST /+login HTTP/1.1\r\nHost: devpi.test\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 200000\r\n\r\n" + b"x" * 1000)
        [(status, headers, body)] = connection.responses()
        self.assertEqual(status, 507)
        self.assertEqual(json.loads(body)["message"], DISK_FULL)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(errors.events, [])


class LargeJSONBodyTests(SynchronousTestCase):
    """A JSON API body is decoded on the reactor only while that is cheap; a large one in the runner."""

    def request(self, body: bytes) -> Any:
        import io

        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"content-length", [str(len(body)).encode("ascii")])
        request.content = io.BytesIO(body)
        return request

    def test_largeBodyInRunner(self) -> None:
        from twisted.internet.defer import Deferred, ensureDeferred

        from devpi_twisted.web.responses import readJSON

        calls: list[Any] = []

        def runFile(f: Any, *args: Any) -> "Deferred[Any]":
            d: Deferred[Any] = Deferred()
            calls.append((f, args, d))
            return d

        body = json.dumps({"key": "x" * 200_000}).encode("ascii")
        result = ensureDeferred(readJSON(self.request(body), runFile))
        self.assertNoResult(result)
        [(f, args, d)] = calls
        d.callback(f(*args))
        self.assertEqual(self.successResultOf(result), {"key": "x" * 200_000})

    def test_smallBodyInline(self) -> None:
        from twisted.internet.defer import ensureDeferred

        from devpi_twisted.web.responses import readJSON

        def runFile(f: Any, *args: Any) -> Any:
            raise AssertionError("a small body needs no thread")

        result = ensureDeferred(readJSON(self.request(b'{"user": "alice"}'), runFile))
        self.assertEqual(self.successResultOf(result), {"user": "alice"})

    def test_badLargeBodyIs400(self) -> None:
        from twisted.internet.defer import ensureDeferred, maybeDeferred

        from devpi_twisted.errors import BadRequest
        from devpi_twisted.web.responses import readJSON

        result = ensureDeferred(readJSON(self.request(b"{" * 100_000), maybeDeferred))
        self.failureResultOf(result, BadRequest)
