"""
Tests for L{devpi_twisted.testing.fakepypi}.
"""

import base64
import hashlib
import io
import json
import zipfile
from email.parser import BytesParser
from typing import Any

from packaging.utils import parse_wheel_filename
from treq.testing import StubTreq
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from devpi_twisted.model.upstream.common import UpstreamPageError
from devpi_twisted.model.upstream.project import parseProjectPage
from devpi_twisted.model.upstream.projectlist import parseProjectList
from devpi_twisted.testing.fakepypi import FakePyPI, buildWheel

JSON_TYPE = "application/vnd.pypi.simple.v1+json"
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
BASE = "http://upstream.example"


class Fetched:
    """A finished response: status, headers and the whole body."""

    def __init__(self, response: Any, body: bytes) -> None:
        self.code = response.code
        self.length = response.length
        self.headers = response.headers
        self.body = body

    def header(self, name: str) -> str | None:
        value = self.headers.getRawHeaders(name)
        return None if value is None else value[0]


class FakeTestMixin:
    """A fake with two projects, and helpers to fetch from it with L{StubTreq}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakePyPI(self.clock)
        self.wheelName, self.wheel, self.metadata = buildWheel("Demo.Pkg", "1.0", requiresPython=">=3.8")
        self.fake.addFile(
            "Demo.Pkg", self.wheelName, self.wheel,
            requiresPython=">=3.8", uploadTime="2025-01-01T00:00:00.000000Z", coreMetadata=self.metadata,
        )
        self.sdist = b"sdist bytes " * 100
        self.fake.addFile("Demo.Pkg", "demo_pkg-1.1.tar.gz", self.sdist, yanked="broken")
        self.fake.addFile("other", "other-2.0.zip", b"zip")
        self.stub = StubTreq(self.fake.resource())

    def fetch(self, path: str, method: str = "GET", **kwargs: Any) -> Fetched:
        """Request C{path} and read the whole answer."""
        kwargs.setdefault("allow_redirects", False)
        d = self.stub.request(method, BASE + path, **kwargs)
        self.stub.flush()
        response = self.successResultOf(d)  # type: ignore[attr-defined]
        body = response.content()
        self.stub.flush()
        return Fetched(response, self.successResultOf(body))  # type: ignore[attr-defined]

    def page(self, path: str, accept: str | None = JSON_TYPE) -> Fetched:
        headers = {} if accept is None else {"Accept": accept}
        return self.fetch(path, headers=headers)


class SimplePageTests(FakeTestMixin, SynchronousTestCase):
    """
    The fake's C{/simple/} pages.
    """

    def test_projectJSON(self) -> None:
        """The JSON project page has PyPI's shape and every fact given to L{FakePyPI.addFile}."""
        answer = self.page("/simple/demo-pkg/")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), JSON_TYPE)
        self.assertEqual(answer.header("Vary"), "Accept")
        document = json.loads(answer.body)
        self.assertEqual(document["meta"], {"api-version": "1.4"})
        self.assertEqual(document["name"], "demo-pkg")
        self.assertEqual(document["versions"], ["1.0", "1.1"])
        wheel, sdist = sorted(document["files"], key=lambda f: f["filename"])
        self.assertEqual(wheel, {
            "filename": self.wheelName,
            "url": f"../../files/{self.wheelName}",
            "hashes": {"sha256": hashlib.sha256(self.wheel).hexdigest()},
            "requires-python": ">=3.8",
            "size": len(self.wheel),
            "upload-time": "2025-01-01T00:00:00.000000Z",
            "yanked": False,
            "core-metadata": {"sha256": hashlib.sha256(self.metadata).hexdigest()},
            "data-dist-info-metadata": {"sha256": hashlib.sha256(self.metadata).hexdigest()},
            "provenance": None,
        })
        self.assertEqual((sdist["yanked"], sdist["core-metadata"], sdist["requires-python"]), ("broken", False, None))
        self.assertNotIn("upload-time", sdist)

    def test_projectJSONParses(self) -> None:
        """Our parser reads the fake's JSON page back into the registered facts."""
        project = parseProjectPage(
            self.page("/simple/demo-pkg/").body, JSON_TYPE, BASE + "/simple/demo-pkg/", "demo-pkg"
        )
        wheel, sdist = sorted(project.links, key=lambda link: link.filename)
        self.assertEqual(wheel.url, f"{BASE}/files/{self.wheelName}")
        self.assertEqual(wheel.sha256, hashlib.sha256(self.wheel).hexdigest())
        self.assertEqual(wheel.coreMetadata, hashlib.sha256(self.metadata).hexdigest())
        self.assertEqual((wheel.size, wheel.requiresPython, wheel.yanked), (len(self.wheel), ">=3.8", False))
        self.assertEqual((sdist.yanked, sdist.version), ("broken", "1.1"))

    def test_projectHTML(self) -> None:
        """Without an C{Accept} header the page is PEP 503 HTML that our parser reads back."""
        answer = self.page("/simple/demo-pkg/", accept=None)
        self.assertEqual(answer.header("Content-Type"), "text/html")
        self.assertIn(b'<meta name="pypi:repository-version" content="1.4">', answer.body)
        self.assertIn(b'data-requires-python="&gt;=3.8"', answer.body)
        project = parseProjectPage(answer.body, "text/html", BASE + "/simple/demo-pkg/", "demo-pkg")
        wheel, sdist = sorted(project.links, key=lambda link: link.filename)
        self.assertEqual(wheel.sha256, hashlib.sha256(self.wheel).hexdigest())
        self.assertEqual(wheel.coreMetadata, hashlib.sha256(self.metadata).hexdigest())
        self.assertEqual((wheel.requiresPython, sdist.yanked), (">=3.8", "broken"))

    def test_negotiation(self) -> None:
        """pip's C{Accept} gets JSON; the C{html} knob forces HTML; a yank without reason shows in both forms."""
        self.fake.addFile("demo-pkg", "demo_pkg-0.9.tar.gz", b"old", yanked=True)
        answer = self.page("/simple/demo-pkg/", accept=PIP_ACCEPT)
        self.assertEqual(answer.header("Content-Type"), JSON_TYPE)
        files = {f["filename"]: f for f in json.loads(answer.body)["files"]}
        self.assertIs(files["demo_pkg-0.9.tar.gz"]["yanked"], True)
        self.fake.html = True
        answer = self.page("/simple/demo-pkg/", accept=PIP_ACCEPT)
        self.assertEqual(answer.header("Content-Type"), "text/html")
        self.assertIn(b'demo_pkg-0.9.tar.gz#sha256=' + hashlib.sha256(b"old").hexdigest().encode()
                      + b'" data-yanked="">', answer.body)

    def test_projectList(self) -> None:
        """C{/simple/} lists display names as JSON or HTML, both readable by L{parseProjectList}."""
        answer = self.page("/simple/")
        self.assertEqual(answer.header("Content-Type"), JSON_TYPE)
        self.assertEqual(parseProjectList(answer.body, JSON_TYPE), ["Demo.Pkg", "other"])
        answer = self.page("/simple/", accept="text/html")
        self.assertEqual(answer.header("Content-Type"), "text/html")
        self.assertIn(b'<a href="demo-pkg/">Demo.Pkg</a>', answer.body)
        self.assertEqual(parseProjectList(answer.body, "text/html"), ["Demo.Pkg", "other"])

    def test_redirects(self) -> None:
        """Non-normalised names and missing slashes answer 301 with a relative C{Location}."""
        for path, location in [
            ("/simple/Demo.Pkg/", "../demo-pkg/"),
            ("/simple/DEMO_pkg/", "../demo-pkg/"),
            ("/simple/demo-pkg", "demo-pkg/"),
            ("/simple/Demo.Pkg", "demo-pkg/"),
            ("/simple", "simple/"),
        ]:
            answer = self.fetch(path)
            self.assertEqual((answer.code, answer.header("Location")), (301, location), path)

    def test_redirectFollowed(self) -> None:
        """A client following the redirect lands on the normalised page."""
        answer = self.fetch("/simple/Demo_Pkg/", headers={"Accept": JSON_TYPE}, allow_redirects=True)
        self.assertEqual(answer.code, 200)
        self.assertEqual(json.loads(answer.body)["name"], "demo-pkg")

    def test_unknownProject(self) -> None:
        """An unknown project answers 404."""
        self.assertEqual(self.page("/simple/nope/").code, 404)

    def test_notFoundKnob(self) -> None:
        """Projects in C{notFound} answer 404 though registered, whatever spelling was put in the set."""
        self.fake.notFound.add("Demo_Pkg")
        self.assertEqual(self.page("/simple/demo-pkg/").code, 404)
        self.assertEqual(self.page("/simple/other/").code, 200)

    def test_removeFileAndProject(self) -> None:
        """Removed files disappear from page and C{/files/}; a removed project answers 404."""
        self.fake.removeFile("demo-pkg", "demo_pkg-1.1.tar.gz")
        files = json.loads(self.page("/simple/demo-pkg/").body)["files"]
        self.assertEqual([f["filename"] for f in files], [self.wheelName])
        self.assertEqual(self.fetch("/files/demo_pkg-1.1.tar.gz").code, 404)
        self.fake.removeFile("demo-pkg", self.wheelName)
        self.assertEqual(json.loads(self.page("/simple/demo-pkg/").body)["files"], [])
        self.fake.removeProject("Demo.Pkg")
        self.assertEqual(self.page("/simple/demo-pkg/").code, 404)
        self.assertEqual(parseProjectList(self.page("/simple/").body, JSON_TYPE), ["other"])

    def test_serial(self) -> None:
        """C{serial} sets C{X-PyPI-Last-Serial} and C{_last-serial}; L{None} sends neither."""
        answer = self.page("/simple/demo-pkg/")
        self.assertIsNone(answer.header("X-PyPI-Last-Serial"))
        self.fake.serial = 4242
        answer = self.page("/simple/demo-pkg/")
        self.assertEqual(answer.header("X-PyPI-Last-Serial"), "4242")
        self.assertEqual(json.loads(answer.body)["meta"]["_last-serial"], 4242)
        self.assertEqual(self.page("/simple/").header("X-PyPI-Last-Serial"), "4242")
        self.assertIn(b"<!--SERIAL 4242-->", self.page("/simple/demo-pkg/", accept="text/html").body)

    def test_garbage(self) -> None:
        """C{garbage} answers 200 with a body our parsers refuse."""
        self.fake.garbage = True
        answer = self.page("/simple/demo-pkg/")
        self.assertEqual(answer.code, 200)
        self.assertRaises(
            UpstreamPageError, parseProjectPage,
            answer.body, answer.header("Content-Type"), BASE + "/simple/demo-pkg/", "demo-pkg",
        )
        answer = self.page("/simple/", accept="text/html")
        self.assertRaises(UpstreamPageError, parseProjectList, answer.body, answer.header("Content-Type"))

    def test_etags(self) -> None:
        """With C{etags}, a matching C{If-None-Match} gets 304 with the same C{Content-Type}, and a change gets 200."""
        self.assertIsNone(self.page("/simple/demo-pkg/").header("ETag"))
        self.fake.etags = True
        first = self.page("/simple/demo-pkg/")
        etag = first.header("ETag")
        self.assertIsNotNone(etag)
        headers = {"Accept": JSON_TYPE, "If-None-Match": etag}
        again = self.fetch("/simple/demo-pkg/", headers=headers)
        self.assertEqual((again.code, again.body), (304, b""))
        self.assertEqual((again.header("ETag"), again.header("Content-Type")), (etag, JSON_TYPE))
        weak = self.fetch("/simple/demo-pkg/", headers={"Accept": JSON_TYPE, "If-None-Match": f'"x", W/{etag}'})
        self.assertEqual(weak.code, 304)
        html = self.fetch("/simple/demo-pkg/", headers={"Accept": "text/html", "If-None-Match": etag})
        self.assertEqual(html.code, 200)
        self.fake.addFile("demo-pkg", "demo_pkg-2.0.tar.gz", b"new")
        changed = self.fetch("/simple/demo-pkg/", headers=headers)
        self.assertEqual(changed.code, 200)
        self.assertNotEqual(changed.header("ETag"), etag)
        self.fake.etags = False
        self.assertEqual(self.fetch("/simple/demo-pkg/", headers={"If-None-Match": "*"}).code, 200)

    def test_quarantined(self) -> None:
        """A quarantined project shows its status, lists no files and leaves the project list."""
        self.fake.statuses["demo-pkg"] = ("quarantined", "malware report")
        document = json.loads(self.page("/simple/demo-pkg/").body)
        self.assertEqual(document["project-status"], {"status": "quarantined", "reason": "malware report"})
        self.assertEqual(document["files"], [])
        project = parseProjectPage(
            self.page("/simple/demo-pkg/", accept="text/html").body, "text/html", BASE + "/simple/demo-pkg/", "demo-pkg"
        )
        self.assertEqual((project.status, project.statusReason, project.links), ("quarantined", "malware report", ()))
        self.assertEqual(parseProjectList(self.page("/simple/").body, JSON_TYPE), ["other"])

    def test_filesURL(self) -> None:
        """C{filesURL} makes file links absolute on another host."""
        self.fake.filesURL = "https://files.example/packages/"
        files = json.loads(self.page("/simple/other/").body)["files"]
        self.assertEqual(files[0]["url"], "https://files.example/packages/other-2.0.zip")


class FileTests(FakeTestMixin, SynchronousTestCase):
    """
    The fake's C{/files/} downloads.
    """

    def test_file(self) -> None:
        """A file is served whole, with its C{Content-Length} and as C{application/octet-stream}."""
        answer = self.fetch(f"/files/{self.wheelName}")
        self.assertEqual((answer.code, answer.body, answer.length), (200, self.wheel, len(self.wheel)))
        self.assertEqual(answer.header("Content-Type"), "application/octet-stream")

    def test_head(self) -> None:
        """C{HEAD} gives the length without the body."""
        answer = self.fetch(f"/files/{self.wheelName}", method="HEAD")
        self.assertEqual((answer.code, answer.body), (200, b""))
        self.assertEqual(answer.header("Content-Length"), str(len(self.wheel)))

    def test_metadata(self) -> None:
        """C{<file>.metadata} serves the registered core metadata, and 404 where there is none."""
        answer = self.fetch(f"/files/{self.wheelName}.metadata")
        self.assertEqual((answer.code, answer.body), (200, self.metadata))
        self.assertEqual(self.fetch("/files/demo_pkg-1.1.tar.gz.metadata").code, 404)
        self.assertEqual(self.fetch("/files/nothing.whl").code, 404)

    def test_down(self) -> None:
        """C{down} answers 503 to pages and files alike."""
        self.fake.down = True
        for path in ("/simple/", "/simple/demo-pkg/", f"/files/{self.wheelName}"):
            self.assertEqual(self.fetch(path).code, 503, path)
        self.fake.down = False
        self.assertEqual(self.fetch("/simple/demo-pkg/").code, 200)

    def test_hang(self) -> None:
        """C{hang} never answers, and a cancelled request leaves nothing behind."""
        self.fake.hang = True
        d = self.stub.get(BASE + "/simple/demo-pkg/")
        self.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(self.fake.hanging, 1)
        self.clock.advance(3600)
        self.stub.flush()
        self.assertNoResult(d)
        d.cancel()
        self.stub.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.fake.hanging, 0)
        self.assertEqual(self.fake.requests, [("GET", "/simple/demo-pkg/")])

    def test_corruptFiles(self) -> None:
        """C{corruptFiles} serves bytes of the right length that do not match the advertised hash."""
        self.fake.corruptFiles = True
        answer = self.fetch(f"/files/{self.wheelName}")
        self.assertEqual((answer.code, len(answer.body), answer.length), (200, len(self.wheel), len(self.wheel)))
        self.assertNotEqual(answer.body, self.wheel)
        metadata = self.fetch(f"/files/{self.wheelName}.metadata").body
        self.assertEqual(len(metadata), len(self.metadata))
        self.assertNotEqual(metadata, self.metadata)

    def test_truncateFiles(self) -> None:
        """C{truncateFiles} announces the full length, sends less and drops the connection."""
        self.fake.truncateFiles = True
        d = self.stub.get(BASE + "/files/demo_pkg-1.1.tar.gz")
        self.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.length, len(self.sdist))
        received: list[bytes] = []
        done = response.collect(received.append)
        self.stub.flush()
        failure = self.failureResultOf(done, ResponseFailed)
        self.assertEqual(b"".join(received), self.sdist[: len(self.sdist) // 2])
        # The connection ended before Content-Length bytes arrived.
        self.assertTrue(any(reason.check(ConnectionDone, ConnectionLost) for reason in failure.value.reasons))

    def test_slowFiles(self) -> None:
        """C{slowFiles} writes one chunk per C{slowChunkDelay} seconds on the clock."""
        self.fake.slowFiles = True
        self.fake.slowChunkSize = 300
        self.fake.slowChunkDelay = 2.0
        d = self.stub.get(BASE + "/files/demo_pkg-1.1.tar.gz", unbuffered=True)
        self.stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.length, len(self.sdist))
        received: list[bytes] = []
        done = response.collect(received.append)
        self.stub.flush()
        self.assertEqual(sum(map(len, received)), 300)
        self.clock.advance(1.9)
        self.stub.flush()
        self.assertEqual(sum(map(len, received)), 300)
        self.clock.advance(0.1)
        self.stub.flush()
        self.assertEqual(sum(map(len, received)), 600)
        for _ in range(3):
            self.clock.advance(2.0)
            self.stub.flush()
        self.successResultOf(done)
        self.assertEqual(b"".join(received), self.sdist)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slowFileDisconnect(self) -> None:
        """A client that goes away during a slow download cancels the fake's timer."""
        self.fake.slowFiles = True
        self.fake.slowChunkSize = 100
        d = self.stub.get(BASE + "/files/demo_pkg-1.1.tar.gz", unbuffered=True)
        self.stub.flush()
        response = self.successResultOf(d)
        lost: list[Failure] = []

        class Impatient(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.stopProducing()

            def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
                lost.append(reason)

        response.deliverBody(Impatient())
        self.stub.flush()
        self.assertEqual(len(lost), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requestsRecorded(self) -> None:
        """Every request is recorded as C{(method, path)}, including 404s and requests while down."""
        self.fetch("/simple/demo-pkg/")
        self.fetch(f"/files/{self.wheelName}", method="HEAD")
        self.fetch("/nowhere?x=1")
        self.fake.down = True
        self.fetch("/files/other-2.0.zip")
        self.assertEqual(self.fake.requests, [
            ("GET", "/simple/demo-pkg/"),
            ("HEAD", f"/files/{self.wheelName}"),
            ("GET", "/nowhere"),
            ("GET", "/files/other-2.0.zip"),
        ])

    def test_addFileConflicts(self) -> None:
        """A file name belongs to one project; re-adding it to the same project replaces it."""
        self.assertRaises(ValueError, self.fake.addFile, "other", "demo_pkg-1.1.tar.gz", b"x")
        self.fake.addFile("demo_pkg", "demo_pkg-1.1.tar.gz", b"replaced")
        self.assertEqual(self.fetch("/files/demo_pkg-1.1.tar.gz").body, b"replaced")


class BuildWheelTests(SynchronousTestCase):
    """
    Tests for L{buildWheel}.
    """

    def test_recordMatches(self) -> None:
        """C{RECORD} lists every other file with its true sha256 and size, and itself without a hash."""
        filename, wheel, _ = buildWheel("demo-pkg", "1.0", requiresDist=["requests>=2"])
        with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
            self.assertIsNone(archive.testzip())
            names = archive.namelist()
            record = archive.read("demo_pkg-1.0.dist-info/RECORD").decode()
            rows = [line.split(",") for line in record.splitlines()]
            self.assertEqual(sorted(row[0] for row in rows), sorted(names))
            for path, digest, size in rows:
                if path.endswith("/RECORD"):
                    self.assertEqual((digest, size), ("", ""))
                    continue
                data = archive.read(path)
                algorithm, _, encoded = digest.partition("=")
                self.assertEqual(algorithm, "sha256")
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                self.assertEqual((encoded, int(size)), (expected, len(data)), path)

    def test_metadataAndWheel(self) -> None:
        """The returned METADATA is the archive's, with name, version and requirements; WHEEL is pure py3."""
        filename, wheel, metadata = buildWheel(
            "Demo.Pkg", "1.0.0a1", requiresDist=["a>=1", "b; extra == 'x'"], requiresPython=">=3.9"
        )
        self.assertEqual(filename, "demo_pkg-1.0.0a1-py3-none-any.whl")
        name, version, build, tags = parse_wheel_filename(filename)
        self.assertEqual((name, str(version)), ("demo-pkg", "1.0.0a1"))
        with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
            self.assertEqual(archive.read("demo_pkg-1.0.0a1.dist-info/METADATA"), metadata)
            wheelInfo = BytesParser().parsebytes(archive.read("demo_pkg-1.0.0a1.dist-info/WHEEL"))
            module = archive.read("demo_pkg.py").decode()
        parsed = BytesParser().parsebytes(metadata)
        self.assertEqual((parsed["Name"], parsed["Version"]), ("Demo.Pkg", "1.0.0a1"))
        self.assertEqual(parsed.get_all("Requires-Dist"), ["a>=1", "b; extra == 'x'"])
        self.assertEqual(parsed["Requires-Python"], ">=3.9")
        self.assertEqual((wheelInfo["Wheel-Version"], wheelInfo["Root-Is-Purelib"], wheelInfo["Tag"]),
                         ("1.0", "true", "py3-none-any"))
        namespace: dict[str, Any] = {}
        exec(compile(module, "demo_pkg.py", "exec"), namespace)
        self.assertEqual(namespace["VERSION"], "1.0.0a1")

    def test_moduleName(self) -> None:
        """C{module} names the top-level module."""
        _, wheel, _ = buildWheel("demo-pkg", "2", module="other_mod")
        with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
            self.assertIn("other_mod.py", archive.namelist())
            self.assertNotIn("demo_pkg.py", archive.namelist())

    def test_deterministic(self) -> None:
        """The same arguments give the same bytes."""
        self.assertEqual(buildWheel("demo-pkg", "1.0"), buildWheel("demo-pkg", "1.0"))

    def test_invalid(self) -> None:
        """Invalid names, versions and module names are refused."""
        self.assertRaises(ValueError, buildWheel, "-bad-", "1.0")
        self.assertRaises(ValueError, buildWheel, "demo", "not a version")
        self.assertRaises(ValueError, buildWheel, "demo", "1.0", module="no-dashes")
