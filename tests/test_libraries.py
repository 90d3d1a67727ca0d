"""
Where a well-kept library does the job instead of code of our own (issue
12): werkzeug parses C{Accept-Encoding}, treq encodes the multipart body of an
external push, the C{tls:} listener is an endpoint plugin, and the
documentation has one Content-Security-Policy.  The C{Accept} cases are in
L{tests.test_negotiation}.
"""

import hashlib
import io
import os
from typing import Any

import multipart
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from devpi_twisted.app.endpoints import endpointDescription, listenAddress, listenSyntaxError
from devpi_twisted.app.tlsdir import NoCertificates, TLSDirectoryParser, tlsDirectoryParser
from devpi_twisted.model import keys
from devpi_twisted.services.push import PushClient, Pusher
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage
from devpi_twisted.web import server
from devpi_twisted.web.pages import acceptsGzip

from .certs import CA
from .distbuilder import buildWheel
from .releaseharness import ServerHarness, combine
from .test_docs_push import form, makeZip
from .test_push_outbound import DATA, WHEEL, Answered, storeRelease


def _request(acceptEncoding: bytes | None) -> Request:
    request = Request(DummyChannel())
    if acceptEncoding is not None:
        request.requestHeaders.setRawHeaders(b"Accept-Encoding", [acceptEncoding])
    return request


class AcceptsGzipTests(SynchronousTestCase):
    """C{Accept-Encoding} as werkzeug parses it, with devpi's x-gzip alias."""

    def test_named(self) -> None:
        """gzip named, in any case, with a q above 0 (or as x-gzip) allows gzip."""
        for header in (b"gzip", b"GZIP, deflate", b"deflate, gzip;q=0.001", b"x-gzip", b"br;q=1, x-gzip;q=0.5"):
            self.assertTrue(acceptsGzip(_request(header)), header)

    def test_refused(self) -> None:
        """No header, gzip at q=0, or only other codings: no gzip."""
        for header in (None, b"", b"identity", b"gzip;q=0", b"gzip;q=0.000, *", b"deflate, br", b"x-gzip;q=0, *"):
            self.assertFalse(acceptsGzip(_request(header)), header)

    def test_wildcard(self) -> None:
        """* allows gzip unless gzip itself is named."""
        self.assertTrue(acceptsGzip(_request(b"*")))
        self.assertTrue(acceptsGzip(_request(b"identity;q=1, *;q=0.5")))
        self.assertFalse(acceptsGzip(_request(b"*;q=0")))
        self.assertFalse(acceptsGzip(_request(b"gzip;q=0, *;q=1")))

    def test_invalidQualityDropsTheEntry(self) -> None:
        """
        A q outside 0..1 makes werkzeug drop the entry (RFC 9110 has no such
        q), so C{gzip;q=5} alone is no gzip, and with C{*} the wildcard decides.
        """
        self.assertFalse(acceptsGzip(_request(b"gzip;q=5")))
        self.assertTrue(acceptsGzip(_request(b"gzip;q=abc, *")))


class _Consumer(StringTransport):
    """Where a request body is written."""


class _BodyReadingAgent:
    """Reads each request's body to its end, then answers 200."""

    def __init__(self) -> None:
        self.bodies: list[tuple[Headers, Any, bytes]] = []

    def request(self, method: bytes, url: bytes, headers: Headers, body: Any) -> "Deferred[Any]":
        consumer = _Consumer()

        def read(_: Any) -> Any:
            self.bodies.append((headers, body, consumer.value()))
            return Answered()

        return body.startProducing(consumer).addCallback(read)


class PushBodyTests(SynchronousTestCase):
    """The multipart body of an external push, encoded by treq."""

    def push(self, metadata: dict[str, Any]) -> tuple[Headers, Any, bytes]:
        storage, blobs = MemoryStorage(), MemoryBlobStore()
        storeRelease(storage, blobs)
        storage.write(lambda txn: txn.set(keys.versionKey("alice", "dev", "demo-pkg", "1.0"), metadata))
        reactor = MemoryReactorClock()
        agent = _BodyReadingAgent()
        pusher = Pusher(storage, blobs, None, PushClient(agent, reactor))
        d = Deferred.fromCoroutine(pusher.push("alice", "alice", "dev", {
            "name": "demo-pkg", "version": "1.0", "posturl": "https://upload.example/legacy/",
            "username": "u", "password": "p"}))
        # The body is read through the client's reactor, a piece a turn.
        for _ in range(100):
            if d.called:
                break
            reactor.advance(0)
        status, actions = self.successResultOf(d)
        self.assertEqual((status, actions[0][0]), (200, 200))
        [sent] = agent.bodies
        return sent

    def parts(self, headers: Headers, body: bytes) -> list[Any]:
        contentType = headers.getRawHeaders(b"Content-Type")[0].decode()
        self.assertTrue(contentType.startswith("multipart/form-data; boundary="))
        boundary = contentType.split("boundary=", 1)[1]
        return list(multipart.MultipartParser(io.BytesIO(body), boundary, strict=True))

    def test_formAndFile(self) -> None:
        """
        The fields and the file arrive as a strict parser reads them, the
        declared length is the body's, and the file is read on the client's
        reactor (not the global one).
        """
        headers, producer, body = self.push({"name": "demo-pkg", "version": "1.0",
                                             "classifiers": ["A :: B", "C :: D"]})
        self.assertEqual(producer.length, len(body))
        parts = self.parts(headers, body)
        fields = [(part.name, part.value) for part in parts if part.filename is None]
        self.assertIn((":action", "file_upload"), fields)
        self.assertIn(("sha256_digest", hashlib.sha256(DATA).hexdigest()), fields)
        self.assertEqual([value for name, value in fields if name == "classifiers"], ["A :: B", "C :: D"])
        [upload] = [part for part in parts if part.filename is not None]
        self.assertEqual((upload.name, upload.filename, upload.raw), ("content", WHEEL, DATA))

    def test_namesCannotInjectHeaders(self) -> None:
        """A stored metadata key with a line break or a quote stays inside its own part's header."""
        headers, _, body = self.push({"name": "demo-pkg", "version": "1.0",
                                      'summary"\r\nX-Injected: yes': "text"})
        self.assertNotIn(b"\r\nX-Injected", body)
        names = [part.name for part in self.parts(headers, body)]
        self.assertIn('summary"X-Injected: yes', names)


class TLSPluginTests(SynchronousTestCase):
    """C{tls:} is served by our endpoint plugin."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        os.makedirs(self.path)

    def test_foundAsPlugin(self) -> None:
        """Twisted's plugin lookup finds the C{tlsdir:} parser."""
        parsers = list(getPlugins(IStreamServerEndpointStringParser))
        self.assertIn(tlsDirectoryParser.prefix, [p.prefix for p in parsers])
        [ours] = [p for p in parsers if p.prefix == tlsDirectoryParser.prefix]
        self.assertIsInstance(ours, TLSDirectoryParser)

    def test_tlsGoesToThePlugin(self) -> None:
        """
        C{--listen tls:DIR} is parsed once, by our plugin: an empty directory
        is refused with its reason (Twisted's own C{tls:} accepts one).
        """
        self.assertEqual(endpointDescription(f"tls:{self.path}:port=443"), f"tlsdir:{self.path}:port=443")
        self.assertEqual(endpointDescription(f"TLS:{self.path}"), f"tlsdir:{self.path}")
        self.assertEqual(endpointDescription("tcp:3141"), "tcp:3141")
        self.assertRaises(NoCertificates, serverFromString, MemoryReactor(),
                          endpointDescription(f"tls:{self.path}:port=443"))

    def test_listens(self) -> None:
        """With a certificate, the endpoint listens on its port and interface (IPv6 by default)."""
        CA().issue(["a.test"]).writeCombined(os.path.join(self.path, "a.pem"))
        reactor = MemoryReactor()
        endpoint = serverFromString(reactor, endpointDescription(f"tls:{self.path}:port=4443:backlog=7"))
        endpoint.listen(object())
        [(port, _, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (4443, 7, "::"))
        self.assertEqual(listenAddress(f"tls:{self.path}:port=4443"), ("::", 4443))

    def test_unknownParameter(self) -> None:
        """A parameter the endpoint does not have is refused, in the words of C{tls:}, not of our class."""
        CA().issue(["a.test"]).writeCombined(os.path.join(self.path, "a.pem"))
        description = f"tls:{self.path}:sslmethod=x"
        error = self.assertRaises(TypeError, serverFromString, MemoryReactor(), endpointDescription(description))
        self.assertEqual(
            listenSyntaxError(description, error),
            f"--listen {description!r}: tls: has no parameter 'sslmethod'; it takes "
            "DIRECTORY[:port=443][:interface=ADDRESS][:backlog=N], e.g. tls:/etc/devpi-twisted/tls:port=443")


class DocumentationPolicyTests(SynchronousTestCase):
    """One Content-Security-Policy for uploaded documentation."""

    def test_memberCarriesTheOnePolicy(self) -> None:
        """
        A documentation page carries the policy the server gives any other
        HTML under +doc/ (L{server.DOC_CSP}); it lets Sphinx's search form work.
        """
        harness = ServerHarness(self, rootPypi=False)
        harness.createIndex("alice", "dev")
        harness.mustUpload("alice/dev", buildWheel("demo-pkg", "1.0"))
        headers, body = form({":action": "doc_upload", "name": "demo-pkg", "version": "1.0"},
                             makeZip({"index.html": b"<h1>Docs</h1>", "search.js": b"1"}))
        self.assertEqual(harness.request("POST", "/alice/dev/", combine(headers, harness.alice), body).code, 200)
        for name in ("index.html", "search.js"):
            page = harness.get(f"/alice/dev/demo-pkg/1.0/+doc/{name}")
            self.assertEqual(page.code, 200)
            self.assertEqual(page.header("Content-Security-Policy").encode("ascii"), server.DOC_CSP)
        self.assertIn(b"allow-forms", server.DOC_CSP)
