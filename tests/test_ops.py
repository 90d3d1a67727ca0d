"""
Operating the server: limits, security headers, the access log, metrics,
login throttling, the upstream fetch cap, shutdown order, JSON logs and the
systemd units of C{gen-config}.  Everything here runs in memory on a
L{Clock}; the real processes are in C{test_tls} and C{test_daemon}.
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, Logger, LogPublisher, capturedLogs
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.test.requesthelper import DummyChannel
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from OpenSSL.SSL import Connection as TLSConnection
from zope.interface import directlyProvides

from devpi_twisted.admin import cli

from devpi_twisted.admin import genconfig

from devpi_twisted.app import tap
from devpi_twisted.app.logs import JSONLinesObserver, JSONLogService, jsonRecord
from devpi_twisted.model.redact import scrubRequestURI, scrubText, scrubURL
from devpi_twisted.app.shutdown import DrainService, ExitZeroOnSIGTERM, SequentialStopService, WebService
from devpi_twisted.services.throttle import LoginThrottle
from devpi_twisted.app.endpoints import listenAddress
from devpi_twisted.app.tlsdir import CertificateDirectory, NoCertificates, tlsDirectoryParser
from devpi_twisted.mirror.agent import LimitedAgent
from devpi_twisted.web.accesslog import ACCESS_NAMESPACE, AccessLog
from devpi_twisted.app.serverdir import ServerDir
from devpi_twisted.web.limits import limitedRequestFactory
from devpi_twisted.web.metrics import (
    CountingMirrorFiles,
    CountingMirrors,
    Metrics,
    MetricsView,
    RouteLabeler,
    UpstreamStats,
    makeRegistry,
)
from devpi_twisted.web.routes import Routes
from devpi_twisted.web.server import DOC_CSP, HSTS, HTML_CSP, DevpiRequest, DevpiSite, SiteLimits

from .certs import CA
from .helpers import APIHarness, BASE, basicAuth, parseServerOptions

SHIPPED = FilePath(__file__).parent().sibling("systemd")
PEER = "127.0.0.2"


# ---------------------------------------------------------------- the site


class Pages(Resource):
    """A tiny site: C{/slow} answers only when the test says so, C{/json} is JSON, the rest HTML."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render(self, request: Any) -> Any:
        if request.path == b"/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        if request.path == b"/json":
            request.setHeader(b"Content-Type", b"application/json")
            return b"{}"
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return b"<html>hello</html>"


class Connection:
    """One client connection to a L{DevpiSite}, in memory."""

    def __init__(self, site: DevpiSite, peer: str = PEER, secure: bool = False) -> None:
        address = IPv4Address("TCP", peer, 40000)
        self.channel = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 3141),
                                         lenient=True)
        if secure:
            # ISSLTransport extends ITCPTransport, whose setTcpNoDelay HTTPChannel calls.
            directlyProvides(self.transport, ISSLTransport)
            self.transport.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def get(self, path: bytes, headers: bytes = b"") -> None:
        self.send(b"GET " + path + b" HTTP/1.1\r\nHost: devpi.test\r\n" + headers + b"\r\n")

    def responses(self) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        """The complete responses so far: status, headers (lower-case names), body."""
        data = self.transport.value()
        found = []
        while data:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                break
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if headers.get(b"transfer-encoding") == b"chunked":
                end = rest.find(b"\r\n0\r\n\r\n")
                if end < 0:
                    break
                found.append((status, headers, rest[:end]))
                data = rest[end + 7:]
                continue
            found.append((status, headers, rest[:length]))
            data = rest[length:]
        return found

    def close(self) -> None:
        if not self.transport.disconnected or self.channel in self.channel.site.channels:
            self.transport.disconnected = True
            self.channel.connectionLost(Failure(ConnectionDone()))


class SiteTestMixin:
    """A L{DevpiSite} over L{Pages} on a L{Clock}."""

    def makeSite(self, limits: SiteLimits = SiteLimits(), observers: list[Any] | None = None) -> DevpiSite:
        self.clock = Clock()
        self.pages = Pages()
        request = limitedRequestFactory(1000, [(b"X-Devpi-Api-Version", b"2")], base=DevpiRequest)
        self.site = DevpiSite(self.pages, self.clock, limits, request, observers or [])
        self.connections: list[Connection] = []
        self.addCleanup(self.closeAll)  # type: ignore[attr-defined]
        return self.site

    def connect(self, **kw: Any) -> Connection:
        connection = Connection(self.site, **kw)
        self.connections.append(connection)
        return connection

    def closeAll(self) -> None:
        for connection in self.connections:
            if connection.channel in self.site.channels:
                connection.close()


class SiteLimitTests(SiteTestMixin, SynchronousTestCase):
    """Header size and time limits, idle connections and the connection cap."""

    def test_headerTimeout(self) -> None:
        """A client that does not finish its request head in time gets 408 and is disconnected."""
        self.makeSite(SiteLimits(headerTimeout=10, idleTimeout=60))
        connection = self.connect()
        connection.send(b"GET / HTTP/1.1\r\nHost: devpi.test\r\n")
        for _ in range(4):
            self.clock.advance(2)
            connection.send(b"X-Drip: 1\r\n")  # every byte resets the idle timeout, not this one
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(self.pages.pending, [])

    def test_headerTimeoutPerRequest(self) -> None:
        """Each request on a keep-alive connection gets its own header deadline."""
        self.makeSite(SiteLimits(headerTimeout=10, idleTimeout=60))
        connection = self.connect()
        for _ in range(3):
            connection.get(b"/json")
            self.clock.advance(8)
        self.assertEqual([status for status, _, _ in connection.responses()], [200, 200, 200])
        self.assertFalse(connection.transport.disconnecting)

    def test_idleTimeout(self) -> None:
        """A connection that sends nothing is closed after the idle timeout."""
        self.makeSite(SiteLimits(idleTimeout=5))
        connection = self.connect()
        self.clock.advance(4.9)
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(connection.transport.disconnecting)

    def test_idleTimeoutNotWhileAnswering(self) -> None:
        """A slow answer is not cut off by the idle timeout: it only counts between requests."""
        self.makeSite(SiteLimits(idleTimeout=5))
        connection = self.connect()
        connection.get(b"/slow")
        self.clock.advance(60)
        self.assertFalse(connection.transport.disconnecting)
        self.pages.pending[0].write(b"done")
        self.pages.pending[0].finish()
        self.assertEqual(connection.responses()[0][0], 200)

    def test_maxHeaderSize(self) -> None:
        """A request head larger than the limit is refused with 400 and the connection closed."""
        self.makeSite(SiteLimits(maxHeaderSize=1024))
        connection = self.connect()
        connection.get(b"/json", b"X-Big: " + b"a" * 2000 + b"\r\n")
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(connection.transport.disconnecting)
        ok = self.connect()
        ok.get(b"/json", b"X-Small: " + b"a" * 500 + b"\r\n")
        self.assertEqual(ok.responses()[0][0], 200)

    def test_maxHeaders(self) -> None:
        """More header lines than the limit are refused with 400."""
        self.makeSite(SiteLimits(maxHeaders=10))
        connection = self.connect()
        connection.get(b"/json", b"".join(b"X-%d: 1\r\n" % i for i in range(20)))
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 400 "))

    def test_maxConnections(self) -> None:
        """
        Past the connection limit, while every connection is being answered,
        a new connection is answered 503 and closed; a freed slot is reused.
        (A connection waiting for its client would give up its slot instead:
        tests.test_slowclients.)
        """
        self.makeSite(SiteLimits(maxConnections=2))
        first, second = self.connect(), self.connect()
        first.get(b"/slow")
        second.get(b"/slow")
        third = self.connect()
        self.assertTrue(third.transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"Retry-After: 5", third.transport.value())
        self.assertTrue(third.transport.disconnecting)
        self.assertEqual(self.site.refusedConnections, 1)
        third.channel.connectionLost(Failure(ConnectionDone()))
        first.close()
        fourth = self.connect()
        fourth.get(b"/json")
        self.assertEqual(fourth.responses()[0][0], 200)
        self.assertEqual(len(self.site.channels), 2)
        second.close()


class SpoolTests(SynchronousTestCase):
    """Large request bodies wait in the server directory, small ones in memory."""

    def spooledIn(self, request: Any) -> str:
        return os.path.dirname(os.readlink(f"/proc/self/fd/{request.content.fileno()}"))

    def test_largeAndChunkedBodiesInTheSpoolDirectory(self) -> None:
        spool = os.path.abspath(self.mktemp())
        os.makedirs(spool)
        requestClass = limitedRequestFactory(10 ** 9, [], spoolDirectory=spool)
        for length in (100000, None):
            request = requestClass(DummyChannel())
            request.gotLength(length)
            self.addCleanup(request.content.close)
            self.assertEqual(self.spooledIn(request), spool, length)
        self.assertEqual(os.listdir(spool), [], "unnamed: nothing to clean up after a crash")
        small = requestClass(DummyChannel())
        small.gotLength(99999)
        self.assertIsInstance(small.content, io.BytesIO)

    def test_serverDirectorySpool(self) -> None:
        """The server's spool is +spool in its directory."""
        path = FilePath(self.mktemp())
        path.makedirs()
        self.assertEqual(ServerDir(path).spoolDirectory(), path.child("+spool"))
        self.assertTrue(path.child("+spool").isdir())


class SecurityHeaderTests(SiteTestMixin, SynchronousTestCase):
    """nosniff everywhere, a CSP on HTML, HSTS only over TLS."""

    def test_html(self) -> None:
        """An HTML answer carries the strict CSP and nosniff, and no HSTS over plain HTTP."""
        self.makeSite()
        connection = self.connect()
        connection.get(b"/page")
        _, headers, _ = connection.responses()[0]
        self.assertEqual(headers[b"content-security-policy"], HTML_CSP)
        self.assertIn(b"default-src 'none'", HTML_CSP)
        self.assertEqual(headers[b"x-content-type-options"], b"nosniff")
        self.assertNotIn(b"strict-transport-security", headers)

    def test_json(self) -> None:
        """A JSON answer carries nosniff but no CSP."""
        self.makeSite()
        connection = self.connect()
        connection.get(b"/json")
        _, headers, _ = connection.responses()[0]
        self.assertEqual(headers[b"x-content-type-options"], b"nosniff")
        self.assertNotIn(b"content-security-policy", headers)

    def test_hstsOverTLS(self) -> None:
        """Over TLS every answer carries HSTS."""
        self.makeSite()
        connection = self.connect(secure=True)
        connection.get(b"/json")
        _, headers, _ = connection.responses()[0]
        self.assertEqual(headers[b"strict-transport-security"], HSTS)

    def test_documentation(self) -> None:
        """Uploaded documentation gets a sandboxing CSP that still lets it style itself."""
        self.makeSite()
        connection = self.connect()
        connection.get(b"/alice/dev/pkg/1.0/+doc/index.html")
        _, headers, _ = connection.responses()[0]
        self.assertEqual(headers[b"content-security-policy"], DOC_CSP)
        self.assertIn(b"sandbox", DOC_CSP)

    def test_realRoutes(self) -> None:
        """The real server's HTML simple page carries the CSP, its JSON none."""
        harness = APIHarness(self)
        harness.createUser("alice")
        harness.createIndex("alice", "dev")
        clock = Clock()
        request = limitedRequestFactory(1000, [], base=DevpiRequest)
        self.site = DevpiSite(harness.resource, clock, SiteLimits(), request, [])
        self.connections = []
        self.addCleanup(self.closeAll)
        connection = self.connect()
        connection.get(b"/alice/dev/+simple/", b"Accept: text/html\r\n")
        connection.get(b"/alice/dev", b"Accept: application/json\r\n")
        (htmlStatus, html, _), (jsonStatus, api, _) = connection.responses()
        self.assertEqual((htmlStatus, jsonStatus), (200, 200))
        self.assertTrue(html[b"content-type"].startswith(b"text/html"))
        self.assertEqual(html[b"content-security-policy"], HTML_CSP)
        self.assertNotIn(b"content-security-policy", api)
        self.assertEqual(api[b"x-content-type-options"], b"nosniff")


class DrainTests(SiteTestMixin, SynchronousTestCase):
    """What the site does while the server shuts down."""

    def test_waitsForRequestsInFlight(self) -> None:
        """Draining closes idle connections at once and fires when the open request's connection has closed."""
        self.makeSite()
        idle = self.connect()
        busy = self.connect()
        busy.get(b"/slow")
        d = self.site.drain(30)
        self.assertTrue(idle.transport.disconnecting)
        idle.close()
        self.assertNoResult(d)
        self.clock.advance(10)
        self.assertNoResult(d)
        request = self.pages.pending[0]
        request.setHeader(b"Content-Length", b"4")
        request.write(b"done")
        request.finish()
        status, headers, body = busy.responses()[0]
        self.assertEqual((status, body), (200, b"done"))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(busy.transport.disconnecting)
        # The answer may still be in the transport's buffer: wait for the close.
        self.assertNoResult(d)
        busy.close()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleOnly(self) -> None:
        """With only idle connections the drain is over when they have closed."""
        self.makeSite()
        idle = self.connect()
        idle.get(b"/json")
        d = self.site.drain(30)
        self.assertTrue(idle.transport.disconnecting)
        self.assertNoResult(d)
        idle.close()
        self.successResultOf(d)

    def test_graceOver(self) -> None:
        """Requests still open when the grace period ends are cut off, and the drain fires."""
        self.makeSite()
        busy = self.connect()
        busy.get(b"/slow")
        with capturedLogs() as events:
            d = self.site.drain(5)
            self.clock.advance(5)
        self.successResultOf(d)
        self.assertTrue(busy.transport.disconnected)
        self.assertTrue(any("shutdown grace period" in e.get("log_format", "") for e in events))

    def test_nothingInFlight(self) -> None:
        """With nothing in flight the drain is done at once."""
        self.makeSite()
        self.successResultOf(self.site.drain(30))

    def test_refusesNewConnections(self) -> None:
        """A connection that arrives while draining is answered 503."""
        self.makeSite()
        busy = self.connect()
        busy.get(b"/slow")
        d = self.site.drain(30)
        late = self.connect()
        self.assertTrue(late.transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"shutting down", late.transport.value())
        late.channel.connectionLost(Failure(ConnectionDone()))
        self.pages.pending[0].finish()
        busy.close()
        self.successResultOf(d)

    def test_drainService(self) -> None:
        """L{DrainService} drains its site when stopped, with its grace period."""
        self.makeSite()
        busy = self.connect()
        busy.get(b"/slow")
        service = DrainService(self.site, 7)
        service.startService()
        d = service.stopService()
        self.clock.advance(6)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertTrue(busy.transport.disconnected)


class AccessLogTests(SiteTestMixin, SynchronousTestCase):
    """One structured event per request, with nothing secret in it."""

    def logged(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e.get("log_namespace") == ACCESS_NAMESPACE]

    def test_event(self) -> None:
        """A finished request is logged once with method, path, status, bytes, duration and agent."""
        self.makeSite(observers=[AccessLog()])
        connection = self.connect()
        with capturedLogs() as events:
            connection.get(b"/slow", b"User-Agent: pip/25.0\r\n")
            self.clock.advance(1.5)
            request = self.pages.pending[0]
            request.write(b"12345")
            request.finish()
        (event,) = self.logged(events)
        self.assertEqual(
            {k: event[k] for k in ("client", "user", "method", "path", "status", "bytes", "agent", "aborted")},
            {"client": PEER, "user": "-", "method": "GET", "path": "/slow", "status": 200, "bytes": 5,
             "agent": "pip/25.0", "aborted": False},
        )
        self.assertAlmostEqual(event["duration"], 1.5)
        self.assertEqual(event["log_level"], LogLevel.info)

    def test_aborted(self) -> None:
        """A request whose client goes away is logged as 499, aborted."""
        self.makeSite(observers=[AccessLog()])
        connection = self.connect()
        with capturedLogs() as events:
            connection.get(b"/slow")
            connection.channel.connectionLost(Failure(ConnectionLost()))
        (event,) = self.logged(events)
        self.assertEqual((event["status"], event["aborted"]), (499, True))

    def test_noCredentials(self) -> None:
        """Authorization headers never reach the log; secrets in query strings and URLs are masked."""
        self.makeSite(observers=[AccessLog()])
        connection = self.connect()
        with capturedLogs() as events:
            connection.get(b"/json?token=s3cret&page=2&password=hunter2",
                           b"Authorization: Basic YWxpY2U6aHVudGVyMg==\r\n"
                           b"X-Devpi-Auth: YWxpY2U6dG9rZW4=\r\n"
                           b"User-Agent: tool https://alice:hunter2@example.com/\r\n")
        (event,) = self.logged(events)
        text = json.dumps({k: v for k, v in event.items() if isinstance(v, (str, int, float))})
        for secret in ("s3cret", "hunter2", "YWxpY2U", "dG9rZW4"):
            self.assertNotIn(secret, text)
        self.assertEqual(event["path"], "/json?token=***&page=2&password=***")

    def test_refusedUpload(self) -> None:
        """A body over the limit is logged as 413 with its method and path."""
        self.makeSite(observers=[AccessLog()])
        connection = self.connect()
        with capturedLogs() as events:
            connection.send(b"POST /alice/dev/ HTTP/1.1\r\nHost: devpi.test\r\nContent-Length: 5000\r\n\r\n")
            connection.channel.connectionLost(Failure(ConnectionDone()))
        (event,) = self.logged(events)
        self.assertEqual((event["method"], event["path"], event["status"]), ("POST", "/alice/dev/", 413))
        self.assertIn(b"X-Content-Type-Options", connection.transport.value() + b"X-Content-Type-Options")

    def test_trustedProxy(self) -> None:
        """X-Forwarded-For names the client only when the peer is a trusted proxy."""
        self.makeSite(SiteLimits(trustedProxies=frozenset({"127.0.0.9"})), observers=[AccessLog()])
        proxied = self.connect(peer="127.0.0.9")
        direct = self.connect(peer="127.0.0.3")
        with capturedLogs() as events:
            proxied.get(b"/json", b"X-Forwarded-For: 192.0.2.1, 198.51.100.7\r\n")
            direct.get(b"/json", b"X-Forwarded-For: 192.0.2.1\r\n")
        self.assertEqual([e["client"] for e in self.logged(events)], ["198.51.100.7", "127.0.0.3"])

    def test_userLogged(self) -> None:
        """The authenticated user of a request appears in its log line."""
        harness = APIHarness(self)
        harness.createUser("alice")
        request = limitedRequestFactory(1000, [], base=DevpiRequest)
        self.clock = Clock()
        self.site = DevpiSite(harness.resource, self.clock, SiteLimits(), request, [AccessLog()])
        self.connections = []
        self.addCleanup(self.closeAll)
        connection = self.connect()
        with capturedLogs() as events:
            connection.send(b"PUT /alice/dev HTTP/1.1\r\nHost: devpi.test\r\nContent-Length: 2\r\n"
                            b"Authorization: Basic YWxpY2U6c2VjcmV0\r\n\r\n{}")
        (event,) = self.logged(events)
        self.assertEqual((event["user"], event["status"]), ("alice", 200))


class RedactTests(SynchronousTestCase):
    """Credentials are taken out of URLs and request targets."""

    def test_scrubText(self) -> None:
        """User information in any URL in a text is replaced; the rest stays."""
        self.assertEqual(scrubText("fetch https://bob:pw@host/simple/ failed"), "fetch https://***@host/simple/ failed")
        self.assertEqual(scrubText("no url here"), "no url here")
        self.assertEqual(scrubURL("http://token@mirror.example/+simple/"), "http://***@mirror.example/+simple/")
        self.assertIsNone(scrubURL(None))

    def test_scrubRequestURI(self) -> None:
        """Secret-looking query values are masked, others kept."""
        self.assertEqual(scrubRequestURI(b"/a/b?no_projects=&api_key=1&x=2"), "/a/b?no_projects=&api_key=***&x=2")
        self.assertEqual(scrubRequestURI(b"/plain/path"), "/plain/path")


# ---------------------------------------------------------------- throttling


# LoginThrottle itself is tested in tests.test_throttle.


def throttledHarness(testCase: SynchronousTestCase, maxFailures: int = 5) -> tuple[APIHarness, LoginThrottle]:
    """The JSON API in memory with a login throttle on the harness's clock."""
    harness = APIHarness(testCase, loginMaxFailures=maxFailures, loginWindow=60)
    return harness, harness.server.throttle


class LoginThrottleTests(SynchronousTestCase):
    """Throttling through the API: /+login and credentials on any request."""

    def test_loginThrottled(self) -> None:
        """After five wrong passwords /+login answers 429 with Retry-After, even for the right one."""
        harness, _ = throttledHarness(self)
        harness.createUser("alice", "right")
        for _ in range(5):
            self.assertEqual(harness.post("/+login", json={"user": "alice", "password": "wrong"}).code, 401)
        answer = harness.post("/+login", json={"user": "alice", "password": "right"})
        self.assertEqual(answer.code, 429)
        self.assertEqual(answer.header("Retry-After"), "60")
        self.assertIn("too many failed logins", answer.json["message"])
        harness.clock.advance(60)
        self.assertEqual(harness.post("/+login", json={"user": "alice", "password": "right"}).code, 200)

    def test_basicAuthCounts(self) -> None:
        """Wrong Basic credentials on any request count as failed logins."""
        harness, throttle = throttledHarness(self, maxFailures=3)
        harness.createUser("alice", "right")
        for _ in range(3):
            harness.put("/alice/dev", json={}, headers=basicAuth("alice", "wrong"))
        self.assertEqual(throttle.failed, 3)
        answer = harness.put("/alice/dev", json={}, headers=basicAuth("alice", "right"))
        self.assertEqual(answer.code, 429)

    def test_tokensNotThrottled(self) -> None:
        """A valid login token still works while the user's passwords are throttled."""
        harness, _ = throttledHarness(self, maxFailures=2)
        harness.createUser("alice", "right")
        token = harness.login("alice", "right")
        for _ in range(2):
            harness.post("/+login", json={"user": "alice", "password": "wrong"})
        answer = harness.put("/alice/dev", json={}, headers=basicAuth("alice", token))
        self.assertEqual(answer.code, 200, answer.body)


# ---------------------------------------------------------------- metrics


def parseMetrics(text: str) -> dict[str, float]:
    """C{{'name{labels}': value}} of an exposition, labels as written."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class FakeMirrors:
    """What the metrics and the counting proxy need of the mirror coordinator."""

    def __init__(self) -> None:
        self.fresh = True
        self.refreshed: list[Any] = []

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {"root/pypi": {"state": "offline", "consecutive-failures": 3, "last-success": 100.0,
                              "last-failure": 200.0, "last-error": "cannot reach https://***@up/"}}

    def isFresh(self, stage: Any, project: str) -> bool:
        return self.fresh

    async def projectFiles(self, stage: Any, project: str, rootPrefix: str) -> list[Any]:
        return []

    async def refresh(self, stage: Any, project: str) -> None:
        self.refreshed.append(project)


class FakeMirrorFiles:
    """Answers mirror file requests without a mirror."""

    async def answer(self, request: Any, stage: Any, relpath: str) -> bytes:
        return b"data"


class Stage:
    name = "root/pypi"


class RouteLabelTests(SynchronousTestCase):
    """Route templates from the Klein URL map."""

    def test_templates(self) -> None:
        """Paths map to their route template; what matches no route is 'unmatched'."""
        label = RouteLabeler(Routes.app.url_map)
        self.assertEqual(label(b"GET", b"/root/pypi/+simple/requests/"), "/{user}/{index}/+simple/{project}/")
        self.assertEqual(label(b"HEAD", b"/root/pypi/+f/abc/0123/x-1.0.tar.gz"), "/{user}/{index}/+f/{relpath}")
        self.assertEqual(label(b"POST", b"/alice/dev/"), "/{user}/{index}/")
        self.assertEqual(label(b"GET", b"/+status"), "/+status")
        self.assertEqual(label(b"GET", b"/+metrics"), "/+metrics")
        self.assertEqual(label(b"DELETE", b"/+api"), "/+api")
        self.assertEqual(label(b"GET", b"/a/b/c/d/e/f/g"), "unmatched")

    def test_cacheBounded(self) -> None:
        """The label cache never grows past its size."""
        label = RouteLabeler(Routes.app.url_map, cacheSize=10)
        for i in range(100):
            label(b"GET", b"/root/pypi/+simple/p%d/" % i)
        self.assertLessEqual(len(label._cache), 10)


class MetricsTests(SiteTestMixin, SynchronousTestCase):
    """Counting requests in the site and rendering /+metrics."""

    def setUp(self) -> None:
        self.stats = UpstreamStats(4)
        self.mirrors = FakeMirrors()
        self.metrics = Metrics(RouteLabeler(Routes.app.url_map), mirrors=self.mirrors, upstream=self.stats,
                               version="9.9")
        self.makeSite(observers=[self.metrics])
        self.metrics.site = self.site
        self.view = MetricsView(self.metrics, makeRegistry(self.metrics, processMetrics=False))

    def scrape(self, accept: bytes = b"") -> tuple[dict[str, float], bytes]:
        connection = self.connect()
        self.site.resource = _ViewResource(self.view)
        connection.get(b"/+metrics", b"Accept: " + accept + b"\r\n" if accept else b"")
        self.site.resource = self.pages
        status, headers, body = connection.responses()[0]
        self.assertEqual(status, 200)
        connection.close()
        return parseMetrics(body.decode("utf-8")), headers[b"content-type"]

    def test_requests(self) -> None:
        """Requests are counted by route template, method and status, with latency and bytes."""
        connection = self.connect()
        connection.get(b"/alice/dev/+simple/pkg/")
        connection.get(b"/alice/dev/+simple/other/")
        connection.get(b"/slow")
        self.clock.advance(0.3)
        self.pages.pending[0].write(b"x" * 100)
        self.pages.pending[0].finish()
        values, contentType = self.scrape()
        self.assertTrue(contentType.startswith(b"text/plain"))
        simple = 'route="/{user}/{index}/+simple/{project}/"'
        self.assertEqual(values['devpi_http_requests_total{method="GET",%s,status="200"}' % simple], 2)
        self.assertEqual(values['devpi_http_requests_total{method="GET",route="/{user}",status="200"}'], 1)
        self.assertEqual(values['devpi_http_request_duration_seconds_count{route="/{user}"}'], 1)
        self.assertEqual(values['devpi_http_request_duration_seconds_bucket{le="0.25",route="/{user}"}'], 0)
        self.assertEqual(values['devpi_http_request_duration_seconds_bucket{le="0.5",route="/{user}"}'], 1)
        self.assertAlmostEqual(values['devpi_http_request_duration_seconds_sum{route="/{user}"}'], 0.3)
        self.assertEqual(values['devpi_http_response_bytes_total{route="/{user}"}'], 100)
        self.assertEqual(values["devpi_http_connections_open"], 2)
        self.assertEqual(values['devpi_info{version="9.9"}'], 1)

    def test_aborted(self) -> None:
        """A request whose client left is counted with status 499."""
        connection = self.connect()
        connection.get(b"/slow")
        # the scrape itself is in flight too
        self.assertEqual(self.scrape()[0]["devpi_http_requests_in_flight"], 2)
        connection.close()
        values, _ = self.scrape()
        self.assertEqual(values['devpi_http_requests_total{method="GET",route="/{user}",status="499"}'], 1)
        self.assertEqual(values["devpi_http_requests_in_flight"], 1)

    def test_mirrorsAndUpstream(self) -> None:
        """Mirror states and upstream counts appear as gauges and counters."""
        self.stats.answered("page", 200)
        self.stats.answered("file", 503)
        self.stats.failed("page")
        self.stats.received("file", 1234)
        values, _ = self.scrape()
        self.assertEqual(values['devpi_mirror_state{mirror="root/pypi",state="offline"}'], 1)
        self.assertEqual(values['devpi_mirror_state{mirror="root/pypi",state="online"}'], 0)
        self.assertEqual(values['devpi_mirror_consecutive_failures{mirror="root/pypi"}'], 3)
        self.assertEqual(values['devpi_mirror_last_failure_timestamp_seconds{mirror="root/pypi"}'], 200)
        self.assertEqual(values['devpi_upstream_requests_total{kind="page",status="200"}'], 1)
        self.assertEqual(values['devpi_upstream_requests_total{kind="page",status="error"}'], 1)
        self.assertEqual(values['devpi_upstream_errors_total{kind="file"}'], 1)
        self.assertEqual(values['devpi_upstream_bytes_total{kind="file"}'], 1234)
        self.assertEqual(values["devpi_upstream_fetches_limit"], 4)

    def test_cacheHitsAndMisses(self) -> None:
        """Fresh pages are hits, stale ones misses; mirror files fetched upstream are misses, stored ones hits."""
        counting = CountingMirrors(self.mirrors, self.metrics)
        countingFiles = CountingMirrorFiles(FakeMirrorFiles(), self.metrics)
        self.successResultOf(Deferred.fromCoroutine(counting.refresh(Stage(), "pkg")))
        self.assertEqual(self.mirrors.refreshed, ["pkg"])
        self.assertTrue(counting.isFresh(Stage(), "pkg"))
        self.mirrors.fresh = False
        self.assertFalse(counting.isFresh(Stage(), "pkg"))
        self.successResultOf(Deferred.fromCoroutine(counting.projectFiles(Stage(), "pkg", "/")))
        self.pages.render = lambda request: (  # type: ignore[method-assign]
            Deferred.fromCoroutine(countingFiles.answer(request, Stage(), "x")) and NOT_DONE_YET
            if request.path.endswith(b".new") else b"stored")
        connection = self.connect()
        connection.get(b"/root/pypi/+f/abc/def/pkg-1.0.tar.gz")
        connection.get(b"/root/pypi/+f/abc/def/pkg-2.0.tar.gz.new")
        connection.close()
        values, _ = self.scrape()
        self.assertEqual(values['devpi_mirror_cache_total{kind="page",result="hit"}'], 1)
        self.assertEqual(values['devpi_mirror_cache_total{kind="page",result="miss"}'], 1)
        self.assertEqual(values['devpi_mirror_cache_total{kind="file",result="hit"}'], 1)
        self.assertEqual(values['devpi_mirror_cache_total{kind="file",result="miss"}'], 1)

    def test_uploads(self) -> None:
        """Form POSTs to an index are counted as uploads by status."""
        connection = self.connect()
        body = b"--b\r\nContent-Disposition: form-data; name=\":action\"\r\n\r\nfile_upload\r\n--b--\r\n"
        connection.send(b"POST /alice/dev/ HTTP/1.1\r\nHost: devpi.test\r\nContent-Type: multipart/form-data; "
                        b"boundary=b\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        values, _ = self.scrape()
        self.assertEqual(values['devpi_uploads_total{status="200"}'], 1)
        self.assertEqual(values["devpi_upload_bytes_total"], len(body))

    def test_openMetrics(self) -> None:
        """A scraper asking for OpenMetrics gets it."""
        _, contentType = self.scrape(b"application/openmetrics-text; version=1.0.0")
        self.assertTrue(contentType.startswith(b"application/openmetrics-text"))

    def test_statusList(self) -> None:
        """devpi's [name, type, value] list for /+status has the totals."""
        connection = self.connect()
        connection.get(b"/json")
        names = {name: (kind, value) for name, kind, value in self.view.statusList()}
        self.assertEqual(names["devpi_http_requests_total"], ("counter", 1))
        self.assertEqual(names["devpi_http_connections_open"], ("gauge", 1))


class _ViewResource(Resource):
    isLeaf = True

    def __init__(self, view: MetricsView) -> None:
        super().__init__()
        self._view = view

    def render(self, request: Any) -> bytes:
        return self._view.render(request)


class MetricsRouteTests(SynchronousTestCase):
    """/+metrics and /+status through the real routes."""

    def setUp(self) -> None:
        self.harness = APIHarness(self, rootPypi=True, outsideURL="https://robot:hunter2@pypi.example.com")
        # root/pypi's upstream fails until the mirror is offline
        self.harness.upstream.down = True
        for project in ("a", "b", "c"):
            self.harness.settle(self.harness.treq.get(BASE + f"/root/pypi/+simple/{project}/"))
        self.treq = self.harness.treq

    def test_metrics(self) -> None:
        """GET /+metrics answers the Prometheus text format with the serial and process metrics."""
        self.harness.createUser("alice")
        response = self.successResultOf(self.treq.get(BASE + "/+metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"Content-Type")[0].startswith(b"text/plain; version="))
        values = parseMetrics(self.successResultOf(response.text()))
        self.assertEqual(values["devpi_serial"], self.harness.storage.currentSerial())
        self.assertIn("process_cpu_seconds_total", values)

    def test_statusHasMetricsAndNoCredentials(self) -> None:
        """/+status lists devpi-style metrics and the mirrors, with no credentials anywhere."""
        response = self.successResultOf(self.treq.get(BASE + "/+status", headers={b"Accept": [b"application/json"]}))
        body = self.successResultOf(response.content())
        result = json.loads(body)["result"]
        self.assertIn(["devpi_uploads_total", "counter", 0], result["metrics"])
        self.assertEqual(result["mirrors"]["root/pypi"]["state"], "offline")
        self.assertEqual(result["outside-url"], "https://***@pypi.example.com")
        self.assertNotIn(b"hunter2", body)

    def test_metricsMethod(self) -> None:
        """POST to /+metrics is 405."""
        response = self.successResultOf(self.treq.post(BASE + "/+metrics", data=b""))
        self.assertEqual(response.code, 405)


# ---------------------------------------------------------------- upstream cap


class FakeAgent:
    """Records requests; each answer is a Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, Deferred[Any]]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append((uri, d))
        return d


class FakeResponse:
    """An IResponse whose body the test delivers."""

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    length = 4
    request = None
    previousResponse = None

    def __init__(self, code: int = 200) -> None:
        self.code = code
        self.headers = Headers()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(StringTransport())

    def setPreviousResponse(self, response: Any) -> None:
        pass

    def finishBody(self, data: bytes = b"body") -> None:
        self.protocol.dataReceived(data)
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Collector(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done = True


class LimitedAgentTests(SynchronousTestCase):
    """At most N upstream requests at once, a slot held until the body is read."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = FakeAgent()
        self.stats = UpstreamStats(1)
        self.semaphore = DeferredSemaphore(1)
        self.agent = LimitedAgent(self.inner, self.semaphore, self.clock, "file", self.stats, releaseAfter=30)

    def test_queued(self) -> None:
        """A second request waits until the first one's body has been read."""
        first = self.agent.request(b"GET", b"http://up/1")
        second = self.agent.request(b"GET", b"http://up/2")
        self.assertEqual([uri for uri, _ in self.inner.requests], [b"http://up/1"])
        self.assertEqual((self.stats.active, self.stats.waiting), (1, 1))
        response = FakeResponse()
        self.inner.requests[0][1].callback(response)
        wrapped = self.successResultOf(first)
        self.assertEqual(wrapped.code, 200)
        self.assertEqual(len(self.inner.requests), 1)
        collector = Collector()
        wrapped.deliverBody(collector)
        response.finishBody(b"12345")
        self.assertEqual((collector.data, collector.done), (b"12345", True))
        self.assertEqual(len(self.inner.requests), 2)
        self.assertNoResult(second)
        self.assertEqual(self.stats.bytes, {"file": 5})
        self.assertEqual(self.stats.requests, {("file", "200"): 1})
        self.inner.requests[1][1].errback(Failure(ConnectionLost()))
        self.failureResultOf(second, ConnectionLost)
        self.assertEqual(self.stats.errors, {"file": 1})
        self.assertEqual((self.stats.active, self.stats.waiting, self.semaphore.tokens), (0, 0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unreadBodyReleased(self) -> None:
        """A response nobody reads gives its slot back after C{releaseAfter}."""
        first = self.agent.request(b"GET", b"http://up/1")
        self.inner.requests[0][1].callback(FakeResponse())
        self.successResultOf(first)
        second = self.agent.request(b"GET", b"http://up/2")
        self.clock.advance(29)
        self.assertEqual(len(self.inner.requests), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.inner.requests), 2)
        self.inner.requests[1][1].callback(FakeResponse())
        self.successResultOf(second).deliverBody(Collector())

    def test_cancelWhileWaiting(self) -> None:
        """A request cancelled while it waits for a slot leaves the queue and is never sent."""
        first = self.agent.request(b"GET", b"http://up/1")
        second = self.agent.request(b"GET", b"http://up/2")
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.stats.waiting, 0)
        self.inner.requests[0][1].callback(FakeResponse())
        response = self.successResultOf(first)
        response.deliverBody(Collector())
        response._original.finishBody()
        self.assertEqual(len(self.inner.requests), 1)
        self.assertEqual(self.semaphore.tokens, 1)


# ---------------------------------------------------------------- shutdown


class Recorder(Service):
    """Records when it is stopped; its stop finishes when the test says so."""

    def __init__(self, name: str, log: list[str], wait: bool = False) -> None:
        self.setName(name)
        self._log = log
        self._wait = wait
        self.stopping: Deferred[None] | None = None

    def stopService(self) -> Any:
        super().stopService()
        self._log.append(self.name)
        if self._wait:
            self.stopping = Deferred()
            return self.stopping
        return None


class ShutdownTests(SynchronousTestCase):
    """Stopping in order, and the exit status after SIGTERM."""

    def test_sequential(self) -> None:
        """Children stop one at a time, last first, each after the previous one finished."""
        log: list[str] = []
        top = SequentialStopService()
        storage = Recorder("storage", log)
        storage.setServiceParent(top)
        web = Recorder("web", log, wait=True)
        web.setServiceParent(top)
        top.startService()
        d = top.stopService()
        self.assertEqual(log, ["web"])
        self.assertNoResult(d)
        web.stopping.callback(None)  # type: ignore[union-attr]
        self.successResultOf(d)
        self.assertEqual(log, ["web", "storage"])

    def test_webService(self) -> None:
        """The web service closes all listeners first, then waits for the drain."""
        log: list[str] = []
        drain = Recorder("drain", log, wait=True)
        web = WebService(drain)  # type: ignore[arg-type]
        for name in ("tcp", "ssl"):
            web.addListener(Recorder(name, log))
        web.startService()
        d = web.stopService()
        self.assertEqual(sorted(log[:2]), ["ssl", "tcp"])
        self.assertEqual(log[2], "drain")
        self.assertNoResult(d)
        drain.stopping.callback(None)  # type: ignore[union-attr]
        self.successResultOf(d)

    def test_failureDoesNotStopTheRest(self) -> None:
        """A child whose stop fails is logged and the others still stop."""
        log: list[str] = []
        top = SequentialStopService()
        Recorder("storage", log).setServiceParent(top)
        broken = Recorder("broken", log, wait=True)
        broken.setServiceParent(top)
        top.startService()
        d = top.stopService()
        broken.stopping.errback(RuntimeError("boom"))  # type: ignore[union-attr]
        self.successResultOf(d)
        self.assertEqual(log, ["broken", "storage"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_exitZeroOnSIGTERM(self) -> None:
        """The reactor's SIGTERM handler is replaced by one that stops it without marking an exit signal."""
        reactor = FakeReactor()
        installed: dict[int, Any] = {signal.SIGTERM: reactor.sigTerm}
        service = ExitZeroOnSIGTERM(reactor, installSignal=installed.__setitem__, getSignal=installed.get)
        service.startService()
        self.assertTrue(service.installed)
        handler = installed[signal.SIGTERM]
        self.assertIsNot(handler, reactor.sigTerm)
        handler(signal.SIGTERM, None)
        self.assertEqual(reactor.stops, 0)
        for f in reactor.fromThread:
            f()
        self.assertEqual(reactor.stops, 1)
        self.assertIsNone(reactor._exitSignal)

    def test_secondSIGTERMWhileStopping(self) -> None:
        """A second SIGTERM during the shutdown the first one began stops the reactor only once."""
        reactor = FakeReactor()
        installed: dict[int, Any] = {signal.SIGTERM: reactor.sigTerm}
        service = ExitZeroOnSIGTERM(reactor, installSignal=installed.__setitem__, getSignal=installed.get)
        service.startService()
        installed[signal.SIGTERM](signal.SIGTERM, None)
        installed[signal.SIGTERM](signal.SIGTERM, None)
        for f in reactor.fromThread:
            f()
        self.assertEqual(reactor.stops, 1)

    def test_leavesOtherHandlers(self) -> None:
        """Without the reactor's own SIGTERM handler (no signal handling) nothing is installed."""
        reactor = FakeReactor()
        installed: dict[int, Any] = {signal.SIGTERM: signal.SIG_DFL}
        service = ExitZeroOnSIGTERM(reactor, installSignal=installed.__setitem__, getSignal=installed.get)
        service.startService()
        self.assertFalse(service.installed)
        self.assertEqual(installed[signal.SIGTERM], signal.SIG_DFL)


class FakeReactor:
    running = True
    _exitSignal = None

    def __init__(self) -> None:
        self.stops = 0
        self.fromThread: list[Any] = []

    def sigTerm(self, number: int, frame: Any) -> None:
        self._exitSignal = number

    def callWhenRunning(self, f: Any) -> None:
        f()

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.fromThread.append(lambda: f(*args))

    def stop(self) -> None:
        self.stops += 1


# ---------------------------------------------------------------- JSON logs


class JSONLogTests(SynchronousTestCase):
    """JSON lines for log shippers."""

    def test_record(self) -> None:
        """An event becomes one JSON object with time, level, namespace, message and its plain fields."""
        events: list[dict[str, Any]] = []
        logger = Logger(namespace="devpi_twisted.test", observer=events.append)
        logger.info("stored {filename} from {url}", filename="a-1.0.tar.gz", url="https://u:pw@h/x", size=3,
                    obj=object())
        record = json.loads(jsonRecord(events[0]))
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "devpi_twisted.test")
        self.assertEqual(record["message"], "stored a-1.0.tar.gz from https://***@h/x")
        self.assertEqual((record["filename"], record["size"], record["url"]), ("a-1.0.tar.gz", 3, "https://***@h/x"))
        self.assertNotIn("obj", record)
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")

    def test_failure(self) -> None:
        """A logged failure carries its traceback."""
        events: list[dict[str, Any]] = []
        logger = Logger(observer=events.append)
        try:
            1 / 0
        except ZeroDivisionError:
            logger.failure("oops")
        record = json.loads(jsonRecord(events[0]))
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_service(self) -> None:
        """--json-log writes a line per event to its file while the service runs."""
        publisher = LogPublisher()
        path = self.mktemp()
        service = JSONLogService(path, publisher)
        service.startService()
        Logger(observer=publisher).info("one {n}", n=1)
        service.stopService()
        Logger(observer=publisher).info("after stop")
        with open(path) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([line["message"] for line in lines], ["one 1"])

    def test_observer(self) -> None:
        """The observer for twistd --logger writes newline-terminated JSON."""
        out = io.StringIO()
        JSONLinesObserver(out)({"log_format": "hi", "log_level": LogLevel.warn, "log_time": 0.0})
        self.assertEqual(json.loads(out.getvalue())["message"], "hi")
        self.assertTrue(out.getvalue().endswith("}\n"))


# ---------------------------------------------------------------- options


class OperationsOptionsTests(SynchronousTestCase):
    """The options of the limits, shutdown and logs."""

    def parse(self, *argv: str, environ: dict[str, str] | None = None) -> Any:
        return parseServerOptions(self, *argv, environ=environ)

    def test_defaults(self) -> None:
        """Every limit has its documented default."""
        config = self.parse().toConfig()
        self.assertEqual(
            (config.shutdownGrace, config.idleTimeout, config.headerTimeout, config.maxHeaderSize,
             config.maxConnections, config.maxUpstreamFetches, config.loginMaxFailures, config.loginWindow,
             config.trustedProxies, config.accessLog, config.jsonLog),
            (30.0, 60.0, 30.0, 16384, 500, 32, 5, 60.0, (), True, None),
        )

    def test_set(self) -> None:
        """The options set the configuration, also from the environment."""
        config = self.parse("--shutdown-grace", "5", "--max-connections", "10", "--trusted-proxies",
                            "127.0.0.1, ::1", "--no-access-log", "--json-log", "-",
                            environ={"DEVPI_TWISTED_MAX_UPSTREAM_FETCHES": "3"}).toConfig()
        self.assertEqual((config.shutdownGrace, config.maxConnections, config.maxUpstreamFetches),
                         (5.0, 10, 3))
        self.assertEqual(config.trustedProxies, ("127.0.0.1", "::1"))
        self.assertFalse(config.accessLog)
        self.assertEqual(config.jsonLog, "-")

    def test_invalid(self) -> None:
        """Zero or negative limits are usage errors."""
        from twisted.python.usage import UsageError

        for argv in (["--max-connections", "0"], ["--shutdown-grace", "-1"], ["--header-timeout", "0"],
                     ["--login-max-failures", "-1"], ["--max-upstream-fetches", "0"]):
            self.assertRaises(UsageError, self.parse, *argv)

    def test_sslmethodRefused(self) -> None:
        """An ssl: listener asking for an old protocol method is refused."""
        from twisted.python.usage import UsageError

        error = self.assertRaises(UsageError, self.parse, "--listen",
                                  "ssl:443:privateKey=k.pem:sslmethod=TLSv1_METHOD")
        self.assertIn("TLS 1.2", str(error))

    def test_help(self) -> None:
        """--help lists the new options."""
        text = str(tap.Options())
        for option in ("--shutdown-grace", "--idle-timeout", "--header-timeout", "--max-header-size",
                       "--max-connections", "--max-upstream-fetches", "--login-max-failures", "--login-window",
                       "--trusted-proxies", "--json-log", "--no-access-log"):
            self.assertIn(option, text)

    def test_badListener(self) -> None:
        """A listener whose key file is missing stops the start with a message, before the directory is touched."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        serverdir = FilePath(self.mktemp())
        options = self.parse("--serverdir", serverdir.path, "--listen",
                             "ssl:0:interface=127.0.0.1:privateKey=/nonexistent/key.pem")
        error = self.assertRaises(SystemExit, tap.makeService, options, FakeReactor())
        self.assertEqual(error.code, 1)
        self.assertIn("--listen", stderr.getvalue())
        self.assertFalse(serverdir.exists())


# ---------------------------------------------------------------- tls: directory


def servedName(directory: CertificateDirectory, name: bytes | None) -> list[str]:
    """The DNS names of the certificate a client asking for C{name} gets."""
    connection = directory.serverConnectionForTLS(None)
    context = directory.contextForName(name) if name else None
    context = context or connection.get_context()
    probe = TLSConnection(context)
    return _dnsNames(probe.get_certificate().to_cryptography())


def _dnsNames(certificate: Any) -> list[str]:
    from cryptography import x509 as cx509

    extension = certificate.extensions.get_extension_for_class(cx509.SubjectAlternativeName)
    return extension.value.get_values_for_type(cx509.DNSName)


class CertificateDirectoryTests(SynchronousTestCase):
    """The C{tls:} listener's certificates, re-read when they change."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.ca = CA()
        self.path = self.mktemp()
        os.makedirs(self.path)

    def test_noCertificates(self) -> None:
        """A directory without a key and its certificate is refused at start."""
        with open(os.path.join(self.path, "cert.pem"), "wb") as f:
            f.write(self.ca.issue(["a.test"]).certificate)
        self.assertRaises(NoCertificates, CertificateDirectory, self.path, self.clock)

    def test_certbotLayout(self) -> None:
        """live/NAME/{privkey,cert,chain,fullchain}.pem serve NAME with the key matched by public key."""
        issued = self.ca.issue(["pypi.example.test", "*.pkg.example.test"])
        live = os.path.join(self.path, "pypi.example.test")
        os.makedirs(live)
        for name, data in (("privkey.pem", issued.key), ("cert.pem", issued.certificate),
                           ("chain.pem", self.ca.pem), ("fullchain.pem", issued.certificate + self.ca.pem)):
            with open(os.path.join(live, name), "wb") as f:
                f.write(data)
        directory = CertificateDirectory(self.path, self.clock)
        self.assertEqual(servedName(directory, b"pypi.example.test"), ["pypi.example.test", "*.pkg.example.test"])
        self.assertIsNotNone(directory.contextForName(b"eu.pkg.example.test"))

    def test_renewedCertificatePickedUp(self) -> None:
        """A renewed certificate for a known name is served once the check interval has passed."""
        pem = os.path.join(self.path, "site.pem")
        self.ca.issue(["old.test"]).writeCombined(pem)
        directory = CertificateDirectory(self.path, self.clock, checkInterval=60)
        self.assertEqual(servedName(directory, None), ["old.test"])
        self.ca.issue(["new.test"]).writeCombined(pem + ".tmp")
        os.replace(pem + ".tmp", pem)
        os.utime(pem, ns=(1, 1))
        self.clock.advance(30)
        self.assertEqual(servedName(directory, None), ["old.test"])
        self.clock.advance(30)
        self.assertEqual(servedName(directory, None), ["new.test"])
        self.assertEqual(directory.loads, 2)

    def test_unknownNameRereads(self) -> None:
        """A name without a certificate makes the directory be read again, at most every few seconds."""
        self.ca.issue(["a.test"]).writeCombined(os.path.join(self.path, "a.pem"))
        directory = CertificateDirectory(self.path, self.clock, checkInterval=3600, unknownInterval=5)
        directory.serverConnectionForTLS(None)
        self.assertIsNone(directory.contextForName(b"b.test"))
        self.ca.issue(["b.test"]).writeCombined(os.path.join(self.path, "b.pem"))
        self.assertIsNone(directory.contextForName(b"b.test"))
        self.clock.advance(5)
        self.assertIsNotNone(directory.contextForName(b"b.test"))
        self.assertEqual(servedName(directory, b"b.test"), ["b.test"])

    def test_brokenFileKeepsServing(self) -> None:
        """A half-written file does not take the served certificates away."""
        pem = os.path.join(self.path, "a.pem")
        self.ca.issue(["a.test"]).writeCombined(pem)
        directory = CertificateDirectory(self.path, self.clock, checkInterval=1)
        with open(pem, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        self.clock.advance(1)
        with capturedLogs() as events:
            self.assertEqual(servedName(directory, None), ["a.test"])
        self.assertTrue(any("keeping the certificates" in e.get("log_format", "") for e in events))

    def test_parseDescription(self) -> None:
        """Endpoint strings split as Twisted splits them, escapes included; unknown parameters are refused."""
        self.assertEqual(listenAddress(r"tls:/etc/tls:port=443:interface=\:\:1"), ("::1", 443))
        self.assertRaises(TypeError, tlsDirectoryParser.parseStreamServer, Clock(), "/d", port="443", sslmethod="x")


# ---------------------------------------------------------------- gen-config


class GenConfigTests(SynchronousTestCase):
    """systemd units from C{devpi-twisted gen-config}."""

    def genConfig(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["gen-config", *argv], out=out, err=err)
        return status, out.getvalue(), err.getvalue()

    def test_shippedUnitsAreTheDefaults(self) -> None:
        """systemd/ holds exactly what gen-config writes for /opt/devpi-twisted/venv (with --socket for the socket)."""
        settings = genconfig.UnitSettings(venv=genconfig.DEFAULT_VENV)
        self.assertEqual(SHIPPED.child("devpi-twisted.service").getContent().decode(),
                         genconfig.serviceUnit(settings))
        socket = genconfig.UnitSettings(venv=genconfig.DEFAULT_VENV, sockets=["[::]:3141"])
        self.assertEqual(SHIPPED.child("devpi-twisted.socket").getContent().decode(),
                         genconfig.socketUnit(socket))

    def test_writes(self) -> None:
        """The units name this venv's twistd, the server directory, the user and every listener."""
        out = self.mktemp()
        status, text, _ = self.genConfig("--out", out, "--serverdir", "/srv/devpi", "--user", "pkg", "--venv",
                                   "/opt/v", "--listen", r"ssl:443:privateKey=/etc/k.pem:interface=\:\:",
                                   "--listen", "tcp:3141:interface=127.0.0.1", "--", "--outside-url",
                                   "https://pypi.example.com")
        self.assertEqual(status, 0)
        self.assertEqual(os.listdir(out), ["devpi-twisted.service"])
        with open(os.path.join(out, "devpi-twisted.service")) as f:
            unit = f.read()
        self.assertIn("ExecStart=/opt/v/bin/twistd \\\n    --nodaemon \\\n    --pidfile= \\\n    --logfile=-", unit)
        self.assertIn('"--listen=ssl:443:privateKey=/etc/k.pem:interface=\\\\:\\\\:"', unit)
        self.assertIn("--listen=tcp:3141:interface=127.0.0.1", unit)
        self.assertIn("--outside-url \\\n    https://pypi.example.com", unit)
        self.assertIn("User=pkg\nGroup=pkg\n", unit)
        self.assertIn("ReadWritePaths=/srv/devpi\n", unit)
        self.assertNotIn("StateDirectory=", unit)
        self.assertIn("systemctl enable --now devpi-twisted.service", text)

    def test_socketActivation(self) -> None:
        """--socket writes a .socket unit and gives the service a matching systemd: listener for each."""
        out = self.mktemp()
        status, text, _ = self.genConfig("--out", out, "--socket", "443", "--socket", "127.0.0.1:3141")
        self.assertEqual(status, 0)
        with open(os.path.join(out, "devpi-twisted.socket")) as f:
            socket = f.read()
        with open(os.path.join(out, "devpi-twisted.service")) as f:
            service = f.read()
        self.assertIn("ListenStream=[::]:443\nListenStream=127.0.0.1:3141\nBindIPv6Only=both\n", socket)
        self.assertIn("--listen=systemd:domain=INET6:index=0 \\\n    --listen=systemd:domain=INET:index=1", service)
        self.assertIn("Requires=devpi-twisted.socket", service)
        self.assertIn("systemctl enable --now devpi-twisted.socket", text)

    def test_jsonLog(self) -> None:
        """--json-log makes twistd log JSON lines to the journal."""
        unit = genconfig.serviceUnit(genconfig.UnitSettings(jsonLog=True))
        self.assertIn("--logger=devpi_twisted.app.logs.jsonStdout", unit)
        self.assertNotIn("--logfile=-", unit)

    def test_homeReadOnly(self) -> None:
        """A venv under /home keeps /home readable."""
        unit = genconfig.serviceUnit(genconfig.UnitSettings(venv="/home/ci/venv"))
        self.assertIn("ProtectHome=read-only", unit)

    def test_usageErrors(self) -> None:
        """A systemd: listener without its socket, a bad address or a relative path is a usage error."""
        for argv in (["--listen", "systemd:domain=INET6:index=0"], ["--socket", "localhost:80"],
                     ["--serverdir", "relative"], ["--user", "root; rm"]):
            status, _, err = self.genConfig("--out", self.mktemp(), *argv)
            self.assertEqual(status, 2, argv)

    def test_quoting(self) -> None:
        """Specifiers, variables, quotes and backslashes survive systemd's unquoting."""
        self.assertEqual(genconfig.quoteArgument("--serverdir=/srv/a"), "--serverdir=/srv/a")
        self.assertEqual(genconfig.quoteArgument("50%"), '"50%%"')
        self.assertEqual(genconfig.quoteArgument("$HOME"), '"$$HOME"')
        self.assertEqual(genconfig.quoteArgument('a "b" c\\:'), '"a \\"b\\" c\\\\:"')

    def test_systemdAnalyzeVerify(self) -> None:
        """The generated and the shipped units pass systemd-analyze verify."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            raise SkipTest(f"{twistd} is missing")
        venv = os.path.dirname(os.path.dirname(twistd))
        generated = self.mktemp()
        status, _, err = self.genConfig("--out", generated, "--venv", venv, "--socket", "[::]:3141",
                                  "--listen", "ssl:443:privateKey=/etc/devpi/key.pem:certKey=/etc/devpi/cert.pem")
        self.assertEqual(status, 0, err)
        shipped = self.mktemp()
        os.makedirs(shipped)
        for name in ("devpi-twisted.service", "devpi-twisted.socket"):
            text = SHIPPED.child(name).getContent().decode()
            # The shipped unit names /opt/devpi-twisted/venv, which verify wants to exist.
            with open(os.path.join(shipped, name), "w") as f:
                f.write(text.replace(genconfig.DEFAULT_VENV, venv))
        for directory in (generated, shipped):
            units = [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
            result = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True,
                                    timeout=120)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertEqual(re.sub(r"(?m)^.*(Failed to connect to bus|No such file or directory.*\.mount).*\n?",
                                    "", result.stderr).strip(), "", result.stderr)
