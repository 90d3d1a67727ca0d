"""
The whole server in memory, for tests of uploads, files and simple pages.

L{ServerHarness} builds the server as C{makeService} does, with
L{devpi_twisted.app.compose.buildServer} (see L{tests.helpers.buildTestServer}),
over a L{MemoryStorage} and a L{MemoryBlobStore}, with C{root/pypi}'s
upstream an empty L{FakePyPI} reached in memory.  Password checks run
inline with a cheap argon2 hasher, time is a L{Clock}, and requests go
through L{StubTreq}, so routing, negotiation, errors and headers are the
real thing; raw requests go to the server's own site.

Files are served by a pull producer, which twisted.web drives with the
global L{Cooperator}; the harness patches that cooperator to run on the
test clock and pumps clock and connection until each answer is complete.
"""

import base64
import json as jsonlib
from dataclasses import dataclass, replace
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.python.failure import Failure
from twisted.internet.testing import StringTransport
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from devpi_twisted.admin.initstate import PYPI_URL, rootPypiConfig
from devpi_twisted.config import ServerConfig
from devpi_twisted.model import keys
from devpi_twisted.model.acl import Policy
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage
from devpi_twisted.testing.fakepypi import FakePyPI

from .distbuilder import Dist, UploadBody, uploadBody
from .helpers import buildTestServer, fastHashing

BASE = "http://devpi.test"
UUID = "fedcba9876543210fedcba9876543210"
ROOT_PASSWORD = "rootpw"
START_TIME = 1_700_000_000.25

PIP_ACCEPT = (
    b"application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
UV_ACCEPT = b"application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
POETRY_ACCEPT = b"application/vnd.pypi.simple.v1+json, */*;q=0.1"
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
PIP_AGENT = b'pip/26.3 {"installer":{"name":"pip","version":"26.3"},"python":"3.11.7"}'
UV_AGENT = b"uv/0.13.9"
BROWSER_AGENT = b"Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"

Headers = dict[bytes, list[bytes]]


def basic(user: str, secret: str) -> Headers:
    """C{Authorization: Basic} for C{user:secret}."""
    value = base64.b64encode(f"{user}:{secret}".encode("utf-8"))
    return {b"Authorization": [b"Basic " + value]}


def combine(*headerDicts: Headers | None) -> Headers:
    """Several header dicts as one; later ones add values."""
    result: Headers = {}
    for headers in headerDicts:
        for name, values in (headers or {}).items():
            result.setdefault(name, []).extend(values)
    return result


@dataclass
class Answer:
    """One response, read completely."""

    code: int
    phrase: bytes
    headers: Any
    body: bytes
    url: str
    length: int | None = None

    def header(self, name: str) -> str | None:
        """
        A response header.  The HTTP client keeps C{Content-Length} out of
        the headers, so it is answered from the parsed length.
        """
        if name.lower() == "content-length" and self.length is not None:
            return str(self.length)
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return None if not values else values[0].decode("latin-1")

    def headerValues(self, name: str) -> list[str]:
        return [v.decode("latin-1") for v in self.headers.getRawHeaders(name.encode("ascii"), [])]

    @property
    def json(self) -> Any:
        return jsonlib.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class _TCPLikeTransport(StringTransport):
    """
    A L{StringTransport} that, like a TCP transport, ignores being asked to
    resume producing after it was told to close.
    """

    def resumeProducing(self) -> None:
        if not self.disconnecting:
            super().resumeProducing()


@dataclass
class RawAnswer:
    """A response as the server wrote it on the wire."""

    code: int
    phrase: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    closed: bool

    def header(self, name: str) -> str | None:
        values = self.headerValues(name)
        return values[0] if values else None

    def headerValues(self, name: str) -> list[str]:
        wanted = name.lower().encode("ascii")
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == wanted]


def parseRawResponse(data: bytes, closed: bool) -> RawAnswer:
    """Split one HTTP/1.1 response (with a Content-Length or none) into its parts."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    _, code, phrase = (lines[0].split(b" ", 2) + [b""])[:3]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return RawAnswer(int(code), phrase, headers, body, closed)


class ServerHarness:
    """
    Users C{root}, C{alice}, C{bob} and C{carol} (passwords C{<name>pw}),
    optionally the C{root/pypi} mirror, and the web resource over memory.
    """

    def __init__(self, testCase: SynchronousTestCase, rootPypi: bool = True,
                 policy: Policy = Policy()) -> None:
        self.testCase = testCase
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.storage = MemoryStorage(clock=self.clock.seconds)
        self.blobs = MemoryBlobStore()
        self.hashing = fastHashing()
        self.config = ServerConfig(
            serverdir=FilePath("/nonexistent/serverdir"),
            listen=("tcp:0:interface=127.0.0.1",),
            policy=policy,
        )
        self.fake = FakePyPI(self.clock)  # root/pypi's upstream
        self.upstreamAgent = RequestTraversalAgent(self.upstreamResource())
        self.server: Any = None
        self.build()
        testCase.addCleanup(self.stop)
        cooperator = Cooperator(scheduler=lambda step: self.clock.callLater(0, step))
        testCase.patch(task, "_theCooperator", cooperator)

        def initial(txn: Any) -> None:
            for name in ("root", "alice", "bob", "carol"):
                password = ROOT_PASSWORD if name == "root" else f"{name}pw"
                txn.set(keys.userKey(name), {
                    "pwhash": self.hashing.hash(password), "created": "2024-01-01T00:00:00Z",
                })
            if rootPypi:
                txn.set(keys.indexKey("root", "pypi"), rootPypiConfig(PYPI_URL, 1800))

        testCase.successResultOf(self.storage.write(initial))
        self.root = basic("root", ROOT_PASSWORD)
        self.alice = basic("alice", "alicepw")
        self.bob = basic("bob", "bobpw")
        self.carol = basic("carol", "carolpw")

    def build(self, filesElsewhere: Any = None, **settings: Any) -> None:
        """
        Build the server anew over the same storage and upstream, as a
        restarted server would (in-memory state, such as cached pages,
        freshness and the mirrors' status machines, is lost), with
        C{settings} changed in its config (and, to play a replica's, the
        mirrors' C{filesElsewhere}).
        """
        self.stop()
        self.config = replace(self.config, **settings)
        self.server = buildTestServer(
            self.config, clock=self.clock, storage=self.storage, blobs=self.blobs,
            upstreamAgent=self.upstreamAgent, secret=b"k" * 48, hashing=self.hashing,
            nodeinfo={"uuid": UUID, "role": "standalone", "storage": "memory"}, version="0.0-test",
            filesElsewhere=filesElsewhere,
        )
        self.auth = self.server.auth
        self.releases = self.server.releases
        self.pages = self.server.pages
        self.mirrors = self.server.mirrors
        self.resource = self.server.resource
        self.treq = StubTreq(self.resource)
        self.mirrors.startService()

    def upstreamResource(self) -> Any:
        """What upstream indexes answer with."""
        return self.fake.resource()

    def stop(self) -> None:
        if self.server is not None and self.server.mirrors.running:
            self.server.mirrors.stopService()

    # driving requests

    def pump(self) -> None:
        """One round: due calls on the clock, then upstream's connections, then ours."""
        self.clock.advance(0)
        self.upstreamAgent.flush()
        self.treq.flush()

    def settle(self, d: Deferred) -> Any:
        """Pump the clock and the in-memory connection until C{d} fires."""
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

    def request(self, method: str, path: str, headers: Headers | None = None,
                body: bytes | None = None, json: Any = None) -> Answer:
        """Send a request to C{BASE + path} and read the whole answer."""
        url = path if path.startswith("http") else BASE + path
        sendHeaders = dict(headers or {})
        data = body
        if json is not None:
            data = jsonlib.dumps(json).encode("utf-8")
            sendHeaders.setdefault(b"Content-Type", [b"application/json"])
        response = self.settle(self.treq.request(
            method, url, headers=sendHeaders, data=data, allow_redirects=False))
        content = self.settle(response.content())
        length = response.length if isinstance(response.length, int) else None
        answer = Answer(response.code, response.phrase, response.headers, content, url,
                        None if method == "HEAD" else length)
        self.testCase.assertNotEqual(answer.code, 500, answer.body)
        return answer

    def makeSite(self) -> Site:
        """The server's site, as C{makeService} builds it."""
        return self.server.site

    def raw(self, data: bytes, site: Site | None = None) -> RawAnswer:
        """
        Send the raw request bytes C{data} (which should ask for
        C{Connection: close}) over a fake TCP connection to C{site} and
        return what the server wrote, byte for byte, with no client in
        between that could add, drop or decode anything.
        """
        site = site or self.makeSite()
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = _TCPLikeTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 3141),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        for _ in range(100_000):
            if transport.disconnecting:
                break
            self.pump()
        closed = transport.disconnecting
        protocol.connectionLost(Failure(ConnectionDone()))
        self.rawWritten = transport.value()
        return parseRawResponse(transport.value(), closed)

    def get(self, path: str, headers: Headers | None = None) -> Answer:
        return self.request("GET", path, headers)

    def head(self, path: str, headers: Headers | None = None) -> Answer:
        return self.request("HEAD", path, headers)

    # setting up

    def createIndex(self, user: str, index: str, auth: Headers | None = None, **config: Any) -> None:
        auth = auth or basic(user, f"{user}pw")
        answer = self.request("PUT", f"/{user}/{index}", combine(auth, {b"Accept": [b"application/json"]}),
                              json=config)
        self.testCase.assertEqual(answer.code, 200, answer.body)

    def modifyIndex(self, user: str, index: str, edits: Any, auth: Headers | None = None) -> None:
        auth = auth or basic(user, f"{user}pw")
        answer = self.request("PATCH", f"/{user}/{index}", combine(auth, {b"Accept": [b"application/json"]}),
                              json=edits)
        self.testCase.assertEqual(answer.code, 200, answer.body)

    def post(self, path: str, upload: UploadBody, auth: Headers | None = None,
             headers: Headers | None = None) -> Answer:
        """POST a prepared form body."""
        return self.request("POST", path, combine(upload.headers, auth, headers), upload.body)

    def upload(self, stage: str, dist: Dist, auth: Headers | None = None, **bodyOptions: Any) -> Answer:
        """Upload C{dist} to C{stage} (C{"user/index"}) as twine does."""
        if auth is None:
            auth = basic(stage.split("/")[0], stage.split("/")[0] + "pw")
        return self.post(f"/{stage}/", uploadBody(dist, **bodyOptions), auth)

    def mustUpload(self, stage: str, dist: Dist, auth: Headers | None = None, **bodyOptions: Any) -> Answer:
        answer = self.upload(stage, dist, auth, **bodyOptions)
        self.testCase.assertEqual(answer.code, 200, answer.body)
        return answer

    # reading pages

    def simpleJSON(self, stage: str, project: str, headers: Headers | None = None) -> Any:
        """The PEP 691 JSON project page, which must answer 200."""
        answer = self.get(f"/{stage}/+simple/{project}/", combine({b"Accept": [PIP_ACCEPT]}, headers))
        self.testCase.assertEqual(answer.code, 200, answer.body)
        self.testCase.assertEqual(answer.header("Content-Type"), JSON_TYPE)
        return answer.json

    def simpleHTML(self, stage: str, project: str, headers: Headers | None = None) -> Answer:
        answer = self.get(f"/{stage}/+simple/{project}/", headers)
        self.testCase.assertEqual(answer.code, 200, answer.body)
        self.testCase.assertEqual(answer.header("Content-Type"), "text/html")
        return answer

    def fileEntry(self, stage: str, project: str, filename: str) -> dict[str, Any]:
        """The JSON file object of C{filename} on the project page."""
        for entry in self.simpleJSON(stage, project)["files"]:
            if entry["filename"] == filename:
                return entry
        self.testCase.fail(f"{filename} is not listed on {stage} {project}")

    def fileURL(self, stage: str, project: str, filename: str) -> str:
        """The absolute URL of a listed file, resolved as pip resolves it."""
        from urllib.parse import urljoin

        page = f"{BASE}/{stage}/+simple/{project}/"
        return urljoin(page, self.fileEntry(stage, project, filename)["url"])

    def fileEntries(self, stage: str, project: str) -> list[dict[str, Any]]:
        return self.simpleJSON(stage, project)["files"]
