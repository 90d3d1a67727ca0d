"""
The layers keep to their side: the domain packages import nothing of the web
layer and no HTTP server types (DESIGN.md, "Architecture").  Checked on the
source, by walking each module's syntax tree, so an import inside a function
counts as well.
"""

import ast
import hashlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import DeferredSemaphore
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from zope.interface import implementer
from zope.interface.verify import verifyObject

import devpi_twisted
from devpi_twisted.mirror.agent import IUpstreamCounter, LimitedAgent
from devpi_twisted.mirror.files import FileFetch, ILiveSink, LiveFile
from devpi_twisted.model.upstream.common import UpstreamLink
from devpi_twisted.services.simple import MirrorSource
from devpi_twisted.testing import MemoryBlobStore
from devpi_twisted.web.metrics import CountingMirrors, UpstreamStats

PACKAGE = Path(devpi_twisted.__file__).parent

# Modules that are HTTP serving, whatever is taken from them.
SERVER_MODULES = ("devpi_twisted.web", "twisted.web.server", "twisted.web.resource", "twisted.web.static")
# Server types in modules that also hold what a client needs (twisted.web.http
# has PotentialDataLoss; twisted.web.iweb has IAgent and IResponse).
SERVER_NAMES = {
    "twisted.web.iweb": {"IRequest"},
    "twisted.web.http": {"Request", "HTTPChannel", "HTTPFactory"},
}


# Every layer below web/: none of them may answer HTTP itself.
DOMAIN_PACKAGES = ("mirror", "services", "model", "replica", "storage")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _absolute(node: ast.ImportFrom, moduleName: str) -> str:
    """The module an import-from names, with relative imports resolved against C{moduleName}."""
    if not node.level:
        return node.module or ""
    base = moduleName.split(".")[: -node.level]
    return ".".join(base + ([node.module] if node.module else []))


def serverImports(source: str, moduleName: str) -> Iterator[str]:
    """What C{source} (the module C{moduleName}) takes from the web layer or HTTP serving."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if any(_within(alias.name, bad) for bad in SERVER_MODULES):
                    yield f"line {node.lineno}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, moduleName)
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if any(_within(module, bad) or _within(full, bad) for bad in SERVER_MODULES) \
                        or alias.name in SERVER_NAMES.get(module, ()):
                    yield f"line {node.lineno}: from {module} import {alias.name}"
        elif isinstance(node, ast.Attribute) and node.attr == "IRequest":
            yield f"line {node.lineno}: .IRequest"


def packageViolations(package: str) -> list[str]:
    """Every module of C{devpi_twisted.<package>} with what it takes from HTTP serving."""
    found = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        moduleName = ".".join(relative.parts)  # a package's own is pkg.__init__, so "." is pkg
        found.extend(f"{moduleName}, {each}" for each in serverImports(path.read_text("utf-8"), moduleName))
    return found


class DomainLayerTests(SynchronousTestCase):
    """The domain packages know no HTTP serving."""

    def test_domainKnowsNoHTTPServer(self) -> None:
        """No module of the layers below web/ imports the web layer, IRequest or twisted.web's server side."""
        for package in DOMAIN_PACKAGES:
            self.assertEqual(packageViolations(package), [], package)


class CheckerTests(SynchronousTestCase):
    """The check finds each way a module could reach the web layer, and lets the client side be."""

    def test_found(self) -> None:
        """Plain, from, relative, nested and attribute imports of server types are all reported."""
        cases = {
            "import devpi_twisted.web.files": "import devpi_twisted.web.files",
            "from devpi_twisted.web.files import FileResponse": "from devpi_twisted.web.files import FileResponse",
            "from devpi_twisted import web": "from devpi_twisted import web",
            "from ..web import metrics": "from devpi_twisted.web import metrics",
            "from twisted.web.server import NOT_DONE_YET": "from twisted.web.server import NOT_DONE_YET",
            "from twisted.web import resource": "from twisted.web import resource",
            "from twisted.web.iweb import IAgent, IRequest": "from twisted.web.iweb import IRequest",
            "from twisted.web.http import PotentialDataLoss, Request": "from twisted.web.http import Request",
            "def f():\n    import twisted.web.resource": "import twisted.web.resource",
            "from twisted.web import iweb\nx: iweb.IRequest": ".IRequest",
        }
        for source, expected in cases.items():
            found = list(serverImports(source, "devpi_twisted.mirror.example"))
            self.assertEqual(len(found), 1, (source, found))
            self.assertIn(expected, found[0], source)

    def test_clientSideAllowed(self) -> None:
        """What an HTTP client needs is not a violation."""
        source = ("from twisted.web.client import Agent, ResponseDone\n"
                  "from twisted.web.http import PotentialDataLoss\n"
                  "from twisted.web.iweb import IAgent, IResponse\n"
                  "from twisted.web.http_headers import Headers\n"
                  "from devpi_twisted.webhooks import x\n"
                  "from .files import FileFetch\n")
        self.assertEqual(list(serverImports(source, "devpi_twisted.mirror.example")), [])


# What model/ may not use: it does no I/O.  The clock is allowed in
# model/timeutil.py only, whose callers may pass the time themselves.
IO_MODULES = ("os", "socket", "time", "tempfile", "subprocess", "threading", "shutil", "select", "asyncio",
              "urllib.request", "http.client", "sqlite3", "twisted.internet.reactor", "twisted.internet.threads",
              "twisted.internet.task", "twisted.internet.protocol", "twisted.internet.endpoints", "treq")
IO_ALLOWED = {"devpi_twisted.model.timeutil": {"time"}}


def ioUses(source: str, moduleName: str) -> Iterator[str]:
    """The I/O modules C{source} imports, and its calls of the builtin C{open}."""
    allowed = IO_ALLOWED.get(moduleName, set())
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, moduleName)
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            yield f"line {node.lineno}: open()"
        for name in names:
            if any(_within(name, bad) for bad in IO_MODULES if bad not in allowed):
                yield f"line {node.lineno}: {name}"
                break


class ModelDoesNoIOTests(SynchronousTestCase):
    """model/ is pure: file objects and times are passed in."""

    def test_noIO(self) -> None:
        """No module of devpi_twisted.model imports an I/O module or opens a file."""
        found = []
        for path in sorted((PACKAGE / "model").rglob("*.py")):
            moduleName = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
            found.extend(f"{moduleName}, {each}" for each in ioUses(path.read_text("utf-8"), moduleName))
        self.assertEqual(found, [])

    def test_checkerFinds(self) -> None:
        """Each way of reaching I/O is reported."""
        for source in ("import os", "from os import path", "import time", "from twisted.internet import reactor",
                       "from twisted.internet.threads import deferToThread", "open('x')", "import socket"):
            self.assertEqual(len(list(ioUses(source, "devpi_twisted.model.example"))), 1, source)
        self.assertEqual(list(ioUses("import time", "devpi_twisted.model.timeutil")), [])
        self.assertEqual(list(ioUses("from twisted.internet.defer import Deferred\nzf.open(info)",
                                     "devpi_twisted.model.example")), [])


@implementer(ILiveSink)
class RecordingSink:
    """A live transfer's reader that is no HTTP request."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer: Any = None
        self.ended: str | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def finish(self) -> None:
        self.ended = "finished"

    def abort(self) -> None:
        self.ended = "aborted"


class LiveFileTests(SynchronousTestCase):
    """A mirror's live transfer streams to any L{ILiveSink}, not only to a request."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.blobs = MemoryBlobStore()
        self.data = [b"first " * 10, b"second " * 10, b"last " * 10]

    def live(self, sha256: str) -> tuple[FileFetch, LiveFile]:
        link = UpstreamLink(filename="pkg-1.0.tar.gz", url="https://upstream.test/pkg-1.0.tar.gz", sha256=sha256,
                            hashes={"sha256": sha256}, requiresPython=None, yanked=False, size=None,
                            uploadTime=None, coreMetadata=False, provenance=None, version="1.0")
        fetch = FileFetch(link, self.blobs.openWriter(), self.clock, 30.0)
        fetch.makeConnection(StringTransport())
        return fetch, LiveFile(link.filename, None, sha256, fetch)

    def test_verifiedThenFinished(self) -> None:
        """The sink gets every byte, the last one only once the hash matched, then C{finish}."""
        fetch, live = self.live(hashlib.sha256(b"".join(self.data)).hexdigest())
        sink = RecordingSink()
        done = live.attach(sink)
        self.assertIsNotNone(sink.producer)
        for chunk in self.data:
            fetch.dataReceived(chunk)
        self.assertEqual(sink.data, self.data[:2])
        fetch.connectionLost(Failure(ResponseDone()))
        self.assertEqual((sink.data, sink.ended, sink.producer), (self.data, "finished", None))
        self.successResultOf(done)

    def test_mismatchAborted(self) -> None:
        """A body that fails verification is aborted, its last chunk never sent."""
        fetch, live = self.live("0" * 64)
        sink = RecordingSink()
        live.attach(sink)
        for chunk in self.data:
            fetch.dataReceived(chunk)
        fetch.connectionLost(Failure(ResponseDone()))
        self.assertEqual((sink.data, sink.ended), (self.data[:2], "aborted"))
        self.failureResultOf(fetch.result)

    def test_readerGoneLeavesTheTransfer(self) -> None:
        """A sink that stops its producer (its reader left) gets no more, and the file is still kept."""
        fetch, live = self.live(hashlib.sha256(b"".join(self.data)).hexdigest())
        sink = RecordingSink()
        done = live.attach(sink)
        fetch.dataReceived(self.data[0])
        sink.producer.pauseProducing()
        sink.producer.stopProducing()
        self.successResultOf(done)
        for chunk in self.data[1:]:
            fetch.dataReceived(chunk)
        fetch.connectionLost(Failure(ResponseDone()))
        self.assertEqual((sink.data, sink.ended), ([], None))
        self.assertEqual(self.successResultOf(fetch.result).blob.size, len(b"".join(self.data)))


class UpstreamCounterTests(SynchronousTestCase):
    """The upstream agents count through an explicit interface."""

    def test_statsProvideTheInterface(self) -> None:
        """The metrics' counts are an L{IUpstreamCounter}."""
        self.assertTrue(verifyObject(IUpstreamCounter, UpstreamStats(2)))

    def test_agentTellsTheCounter(self) -> None:
        """A request waits, holds a slot, is answered and frees the slot, each told to the counter."""
        from twisted.internet.defer import succeed

        calls: list[tuple[Any, ...]] = []

        @implementer(IUpstreamCounter)
        class Counter:
            def waitingChanged(self, change: int) -> None:
                calls.append(("waiting", change))

            def activeChanged(self, change: int) -> None:
                calls.append(("active", change))

            def answered(self, kind: str, status: int) -> None:
                calls.append(("answered", kind, status))

            def failed(self, kind: str) -> None:
                calls.append(("failed", kind))

            def received(self, kind: str, size: int) -> None:
                calls.append(("received", kind, size))

        class Response:
            code = 200

        class Inner:
            def request(self, *args: Any) -> Any:
                return succeed(Response())

        clock = Clock()
        agent = LimitedAgent(Inner(), DeferredSemaphore(1), clock, "page", Counter(), releaseAfter=5)
        self.successResultOf(agent.request(b"GET", b"https://upstream.test/simple/pkg/"))
        clock.advance(5)  # nobody read the body: the slot goes back
        self.assertEqual(calls, [("waiting", 1), ("waiting", -1), ("active", 1), ("answered", "page", 200),
                                 ("active", -1)])


class CountingMirrorsTests(SynchronousTestCase):
    """The counting mirror coordinator passes on, by name, everything its users call."""

    def test_everyMethodPassedOn(self) -> None:
        """What the pages (L{MirrorSource}), the views, push and the file routes call is a method of its own."""
        needed = {name for name, _ in inspect.getmembers(MirrorSource, inspect.isfunction)
                  if not name.startswith("_")}
        needed |= {"statuses", "releaseEntries", "fileAnswer", "isFresh", "refresh", "projectStatus"}
        missing = {name for name in needed if not inspect.isfunction(getattr(CountingMirrors, name, None))}
        self.assertEqual(missing, set())
        self.assertFalse(hasattr(CountingMirrors, "__getattr__"))
