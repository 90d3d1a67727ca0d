"""
Mirror indexes through the real web resource, in memory: C{root/pypi}
mirroring a L{FakePyPI} (see L{tests.mirrorharness}).

Covered: project pages (every upstream field passed on, file URLs
rewritten, revalidation with ETags, serials, 404s, stale pages when upstream
fails), the online / offline / probing machine as requests see it, files
(streamed while stored, verified, shared between clients, served from disk
afterwards), C{.metadata} files, C{--offline-mode}, private names that must
never reach upstream, the streamed project list, and credentials in
C{mirror_url}.
"""

import base64
import hashlib
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model import keys

from .distbuilder import buildWheel as buildPrivateWheel
from .mirrorharness import TIMEOUT, MirrorHarness, RawClient, rawRequest
from .releaseharness import BASE, JSON_TYPE, PIP_ACCEPT, PIP_AGENT, UV_ACCEPT
from .test_releases import PageParser

UPLOADED = "2025-01-01T00:00:00.000000Z"
JSON_ACCEPT = {b"Accept": [b"application/json"]}


class _MirrorCase(SynchronousTestCase):
    """A harness whose upstream has C{Demo.Pkg} 1.0 (a wheel) and 1.1 (a yanked sdist)."""

    expiry = 1800
    offlineMode = False

    def setUp(self) -> None:
        self.h = MirrorHarness(self, expiry=self.expiry, offlineMode=self.offlineMode)
        self.fake = self.h.fake
        self.wheelName, self.wheel, self.metadata = self.h.addWheel(
            "Demo.Pkg", "1.0", requiresPython=">=3.8", uploadTime=UPLOADED)
        self.sdistName = "demo_pkg-1.1.tar.gz"
        self.sdist = bytes(range(256)) * 40
        self.fake.addFile("Demo.Pkg", self.sdistName, self.sdist, yanked="broken")

    def tearDown(self) -> None:
        """Once the mirrors stopped and the connections settled, no timer of ours is left."""
        self.h.stop()
        for _ in range(10):
            self.h.pump()
        ours = [call for call in self.h.clock.getDelayedCalls() if "writeFrom" not in repr(call.func)]
        self.assertEqual(ours, [])

    def page(self, project: str = "demo-pkg", stage: str = "root/pypi") -> Any:
        answer = self.h.mirrorPage(project, stage)
        self.assertEqual(answer.code, 200, answer.body)
        return answer.json

    def filenames(self, project: str = "demo-pkg", stage: str = "root/pypi") -> list[str]:
        return sorted(self.h.mirrorFiles(project, stage))

    def projectRequests(self, project: str = "demo-pkg") -> int:
        return self.h.upstreamPaths().count(f"/simple/{project}/")

    def expire(self) -> None:
        """Let the cached pages expire."""
        self.h.clock.advance(self.expiry + 1)

    def goOffline(self) -> None:
        """Three failed upstream requests take root/pypi offline."""
        self.fake.down = True
        for n in range(3):
            answer = self.h.mirrorPage(f"missing-{n}")
            self.assertEqual(answer.code, 502, answer.body)
        self.assertEqual(self.h.status()["state"], "offline")


class PageTests(_MirrorCase):
    """Project pages come from upstream with every field kept and file URLs rewritten."""

    def test_jsonFields(self) -> None:
        """hashes, requires-python, size, upload-time, yanked and core-metadata are passed on."""
        result = self.page()
        self.assertEqual(result["name"], "demo-pkg")
        self.assertEqual(result["versions"], ["1.0", "1.1"])
        files = {f["filename"]: f for f in result["files"]}
        wheel, sdist = files[self.wheelName], files[self.sdistName]
        self.assertEqual(wheel["hashes"], {"sha256": hashlib.sha256(self.wheel).hexdigest()})
        self.assertEqual(wheel["requires-python"], ">=3.8")
        self.assertEqual(wheel["size"], len(self.wheel))
        self.assertEqual(wheel["upload-time"], UPLOADED)
        self.assertIs(wheel["yanked"], False)
        self.assertEqual(wheel["core-metadata"], {"sha256": hashlib.sha256(self.metadata).hexdigest()})
        self.assertEqual(sdist["yanked"], "broken")
        self.assertEqual(sdist["size"], len(self.sdist))
        self.assertEqual(sdist["hashes"], {"sha256": hashlib.sha256(self.sdist).hexdigest()})
        self.assertIs(sdist["core-metadata"], False)
        self.assertNotIn("upload-time", sdist)

    def test_urlsRewritten(self) -> None:
        """Every file URL leads to this server's +f route by sha256, the file name last."""
        for f in self.page()["files"]:
            url = urljoin(f"{BASE}/root/pypi/+simple/demo-pkg/", f["url"])
            sha = f["hashes"]["sha256"]
            self.assertEqual(url, f"{BASE}/root/pypi/+f/{sha[:3]}/{sha[3:16]}/{f['filename']}")

    def test_htmlFields(self) -> None:
        """The HTML page carries the hash fragment, requires-python, yanked and core-metadata."""
        parsed = PageParser(self.h.simpleHTML("root/pypi", "demo-pkg").text)
        wheel = parsed.link(self.wheelName)
        sha = hashlib.sha256(self.wheel).hexdigest()
        self.assertEqual(wheel["href"], f"../../../../root/pypi/+f/{sha[:3]}/{sha[3:16]}/{self.wheelName}#sha256={sha}")
        self.assertEqual(wheel["data-requires-python"], ">=3.8")
        self.assertEqual(wheel["data-core-metadata"], "sha256=" + hashlib.sha256(self.metadata).hexdigest())
        self.assertNotIn("data-yanked", wheel)
        self.assertEqual(parsed.link(self.sdistName)["data-yanked"], "broken")

    def test_upstreamHTML(self) -> None:
        """An upstream that only speaks HTML works: its hashes, requires-python and yanked are kept."""
        self.fake.html = True
        files = self.h.mirrorFiles("demo-pkg")
        self.assertEqual(sorted(files), [self.wheelName, self.sdistName])
        self.assertEqual(files[self.wheelName]["hashes"]["sha256"], hashlib.sha256(self.wheel).hexdigest())
        self.assertEqual(files[self.wheelName]["requires-python"], ">=3.8")
        self.assertEqual(files[self.sdistName]["yanked"], "broken")
        self.assertEqual(files[self.wheelName]["core-metadata"],
                         {"sha256": hashlib.sha256(self.metadata).hexdigest()})

    def test_redirectedPage(self) -> None:
        """Links of a page upstream redirected to are resolved against the page's final URL."""
        self.h.recording.redirects["/old/simple/"] = "http://upstream.test/simple/"
        self.h.modifyIndex("root", "pypi", {"mirror_url": "http://upstream.test/old/simple/"}, auth=self.h.root)
        self.assertEqual(self.h.get(self.h.mirrorFileURL("demo-pkg", self.wheelName)).body, self.wheel)
        self.assertEqual(self.h.fileRequests(), [f"/files/{self.wheelName}"])

    def test_acceptHeader(self) -> None:
        """Upstream is asked for PEP 691 JSON first, HTML accepted, by the normalised name."""
        self.h.mirrorPage("Demo.Pkg")
        self.h.mirrorPage("demo-pkg")
        (path, headers), = [(p, hd) for p, hd in self.h.upstreamHeaders if p.startswith("/simple/")]
        self.assertEqual(path, "/simple/demo-pkg/")
        accept = headers[b"accept"][0].decode("ascii")
        self.assertTrue(accept.startswith("application/vnd.pypi.simple.v1+json"), accept)
        self.assertIn("application/vnd.pypi.simple.v1+html", accept)
        self.assertIn("text/html", accept)
        self.assertNotIn(b"if-none-match", headers)

    def test_cachedWithinExpiry(self) -> None:
        """Within mirror_cache_expiry the page is answered without asking upstream."""
        self.page()
        self.h.clock.advance(self.expiry - 1)
        self.page()
        self.page()
        self.assertEqual(self.projectRequests(), 1)

    def test_changesAfterExpiry(self) -> None:
        """After the expiry upstream is asked again and a new file shows."""
        self.page()
        self.h.addWheel("Demo.Pkg", "2.0")
        self.assertEqual(len(self.filenames()), 2)
        self.expire()
        self.assertIn("demo_pkg-2.0-py3-none-any.whl", self.filenames())
        self.assertEqual(self.projectRequests(), 2)

    def test_etagRevalidation(self) -> None:
        """After the expiry the page is revalidated with If-None-Match; a 304 keeps the links."""
        self.fake.etags = True
        first = self.page()
        self.expire()
        second = self.page()
        self.assertEqual(second["files"], first["files"])
        pages = [(p, hd) for p, hd in self.h.upstreamHeaders if p == "/simple/demo-pkg/"]
        self.assertEqual(len(pages), 2)
        self.assertNotIn(b"if-none-match", pages[0][1])
        self.assertTrue(pages[1][1][b"if-none-match"][0].startswith(b'"'))
        self.assertEqual(self.h.status()["consecutive-failures"], 0)
        # fresh again after the 304
        self.page()
        self.assertEqual(self.projectRequests(), 2)

    def test_etagChanged(self) -> None:
        """When upstream's page changed, the revalidation brings the new page."""
        self.fake.etags = True
        self.page()
        self.h.addWheel("Demo.Pkg", "2.0")
        self.expire()
        self.assertIn("demo_pkg-2.0-py3-none-any.whl", self.filenames())

    def test_olderSerialIgnored(self) -> None:
        """A page with an older serial than the cached one leaves the cached page in place."""
        self.fake.serial = 100
        self.page()
        self.fake.serial = 90
        self.h.addWheel("Demo.Pkg", "2.0")
        self.expire()
        self.assertEqual(self.filenames(), sorted([self.wheelName, self.sdistName]))
        self.assertEqual(self.projectRequests(), 2)
        self.assertEqual(self.h.status()["state"], "online")
        self.fake.serial = 101
        self.expire()
        self.assertIn("demo_pkg-2.0-py3-none-any.whl", self.filenames())

    def test_noSerial(self) -> None:
        """An upstream that sends no serial works, and newer pages replace older ones."""
        self.fake.serial = None
        self.assertEqual(len(self.filenames()), 2)
        self.h.addWheel("Demo.Pkg", "2.0")
        self.expire()
        self.assertEqual(len(self.filenames()), 3)

    def test_serialAppearsLater(self) -> None:
        """A cached page without serial is replaced by one that has a serial, and vice versa."""
        self.fake.serial = None
        self.page()
        self.fake.serial = 5
        self.h.addWheel("Demo.Pkg", "2.0")
        self.expire()
        self.assertEqual(len(self.filenames()), 3)
        self.fake.serial = None
        self.h.addWheel("Demo.Pkg", "3.0")
        self.expire()
        self.assertEqual(len(self.filenames()), 4)

    def test_yankPropagates(self) -> None:
        """A yank and an unyank upstream show after the expiry."""
        self.page()
        self.fake.addFile("Demo.Pkg", self.sdistName, self.sdist)
        self.expire()
        self.assertIs(self.h.mirrorFiles("demo-pkg")[self.sdistName]["yanked"], False)
        self.fake.addFile("Demo.Pkg", self.sdistName, self.sdist, yanked=True)
        self.expire()
        self.assertIs(self.h.mirrorFiles("demo-pkg")[self.sdistName]["yanked"], True)

    def test_quarantined(self) -> None:
        """A project upstream quarantines is shown with its status and no files."""
        self.fake.statuses["demo-pkg"] = ("quarantined", "malware")
        result = self.page()
        self.assertEqual(result["files"], [])
        self.assertEqual(result["project-status"], {"status": "quarantined", "reason": "malware"})

    def test_upstream404(self) -> None:
        """An upstream 404 is a 404, remembered only briefly, then upstream is asked again."""
        answer = self.h.mirrorPage("newproject")
        self.assertEqual(answer.code, 404, answer.body)
        self.assertEqual(self.h.mirrorPage("newproject").code, 404)
        self.assertEqual(self.projectRequests("newproject"), 1)
        self.h.addWheel("newproject", "1.0")
        self.h.clock.advance(61)
        self.assertEqual(self.filenames("newproject"), ["newproject-1.0-py3-none-any.whl"])
        self.assertEqual(self.projectRequests("newproject"), 2)
        self.assertEqual(self.h.status()["consecutive-failures"], 0)

    def test_removedUpstream(self) -> None:
        """A project removed upstream answers 404 once the cached page expired."""
        self.page()
        self.fake.notFound.add("demo-pkg")
        self.expire()
        self.assertEqual(self.h.mirrorPage("demo-pkg").code, 404)

    def test_refresh(self) -> None:
        """POST .../+simple/<project>/refresh makes the next request ask upstream."""
        self.page()
        self.h.addWheel("Demo.Pkg", "2.0")
        answer = self.h.request("POST", "/root/pypi/+simple/demo-pkg/refresh")
        self.assertEqual(answer.code, 302)
        self.assertIn("demo_pkg-2.0-py3-none-any.whl", self.filenames())
        self.assertEqual(self.projectRequests(), 2)

    def test_pageStoredAcrossRestart(self) -> None:
        """A restarted server serves the stored page while upstream is down."""
        self.page()
        self.h.restart()
        self.fake.down = True
        self.assertEqual(self.filenames(), sorted([self.wheelName, self.sdistName]))


class UpstreamFailureTests(_MirrorCase):
    """Upstream errors, timeouts and garbage are never cached: the last good page is served."""

    def assertStale(self) -> None:
        self.assertEqual(self.filenames(), sorted([self.wheelName, self.sdistName]))

    def test_errorServesStale(self) -> None:
        """A 503 after the expiry serves the cached page and counts a failure."""
        self.page()
        self.expire()
        self.fake.down = True
        self.assertStale()
        figures = self.h.status()
        self.assertEqual(figures["consecutive-failures"], 1)
        self.assertIn("503", figures["last-error"])

    def test_garbageServesStale(self) -> None:
        """A garbage page after the expiry serves the cached page and is not stored."""
        self.page()
        self.expire()
        self.fake.garbage = True
        self.assertStale()
        self.fake.garbage = False
        self.h.addWheel("Demo.Pkg", "2.0")
        self.assertEqual(len(self.filenames()), 3)

    def test_timeoutServesStale(self) -> None:
        """An upstream that does not answer within the timeout gets the cached page served."""
        self.page()
        self.expire()
        self.fake.hang = True
        d = self.h.begin("GET", "/root/pypi/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertNoResult(d)
        self.assertEqual(self.fake.hanging, 1)
        self.h.clock.advance(TIMEOUT)
        answer = self.h.settle(d)
        self.assertEqual(answer.code, 200)
        self.assertEqual(len(answer.json["files"]), 2)
        self.assertEqual(self.fake.hanging, 0)
        self.assertIn("within", self.h.status()["last-error"])

    def test_errorWithoutCache(self) -> None:
        """With nothing cached, an upstream error is a 502 with a JSON message, and is not remembered."""
        self.fake.down = True
        answer = self.h.mirrorPage("demo-pkg")
        self.assertEqual(answer.code, 502)
        self.assertIn("demo-pkg", answer.json["message"])
        self.fake.down = False
        self.assertEqual(len(self.filenames()), 2)

    def test_garbageWithoutCache(self) -> None:
        """With nothing cached, a garbage page is a 502, not an empty project."""
        self.fake.garbage = True
        answer = self.h.mirrorPage("demo-pkg")
        self.assertEqual(answer.code, 502)
        self.assertIn("message", answer.json)

    def test_timeoutWithoutCache(self) -> None:
        """With nothing cached, a timeout is a 502 after the request timeout."""
        self.fake.hang = True
        d = self.h.begin("GET", "/root/pypi/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.h.clock.advance(TIMEOUT - 0.1)
        self.h.pump()
        self.assertNoResult(d)
        self.h.clock.advance(0.1)
        answer = self.h.settle(d)
        self.assertEqual(answer.code, 502)
        self.assertIn(str(TIMEOUT), answer.json["message"])

    def test_concurrentRequestsShareOneFetch(self) -> None:
        """Requests for one page while upstream is being asked share that one request."""
        self.fake.hang = True
        first = self.h.begin("GET", "/root/pypi/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        second = self.h.begin("GET", "/root/pypi/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(self.projectRequests(), 1)
        self.h.clock.advance(TIMEOUT)
        self.assertEqual(self.h.settle(first).code, 502)
        self.assertEqual(self.h.settle(second).code, 502)
        self.assertEqual(self.h.status()["consecutive-failures"], 1)


class OnlineOfflineTests(_MirrorCase):
    """The status machine as requests see it."""

    def test_offlineAnswersFromCache(self) -> None:
        """Once offline, cached pages are served and nothing at all is sent upstream."""
        self.page()
        self.expire()
        self.goOffline()
        before = len(self.fake.requests)
        self.assertEqual(len(self.filenames()), 2)
        answer = self.h.mirrorPage("not-cached")
        self.assertEqual(answer.code, 502)
        self.assertIn("not cached", answer.json["message"])
        self.assertEqual(len(self.fake.requests), before)

    def test_offlineAnswersAtOnce(self) -> None:
        """Once offline, a hanging upstream does not delay answers."""
        self.page()
        self.expire()
        self.goOffline()
        self.fake.down = False
        self.fake.hang = True
        d = self.h.begin("GET", "/root/pypi/+simple/demo-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(self.fake.hanging, 0)

    def test_timeoutsTakeItOffline(self) -> None:
        """Consecutive timeouts take the mirror offline like errors do."""
        self.fake.hang = True
        for n in range(3):
            d = self.h.begin("GET", f"/root/pypi/+simple/p{n}/", {b"Accept": [PIP_ACCEPT]})
            self.h.clock.advance(TIMEOUT)
            self.assertEqual(self.h.settle(d).code, 502)
        self.assertEqual(self.h.status()["state"], "offline")

    def test_probingThenOnline(self) -> None:
        """After the back-off delay the next request asks upstream, and success brings it online."""
        self.goOffline()
        self.fake.down = False
        self.assertEqual(self.h.mirrorPage("demo-pkg").code, 502)
        self.h.clock.advance(5)
        self.assertEqual(self.h.status()["state"], "probing")
        self.assertEqual(len(self.filenames()), 2)
        self.assertEqual(self.h.status()["state"], "online")

    def test_probeFailsBacksOff(self) -> None:
        """A failed probe sends the mirror back offline with a doubled delay."""
        self.goOffline()
        self.h.clock.advance(5)
        self.assertEqual(self.h.mirrorPage("demo-pkg").code, 502)
        figures = self.h.status()
        self.assertEqual(figures["state"], "offline")
        self.assertEqual(figures["retry-delay"], 10.0)
        self.h.clock.advance(10)
        self.assertEqual(self.h.status()["state"], "probing")

    def test_statusFigures(self) -> None:
        """/+status shows each mirror's state and figures."""
        self.page()
        figures = self.h.status()
        self.assertEqual(figures["state"], "online")
        self.assertEqual(figures["last-success"], self.h.clock.seconds())
        self.goOffline()
        figures = self.h.status()
        self.assertEqual(figures["consecutive-failures"], 3)
        self.assertEqual(figures["retry-delay"], 5.0)
        self.assertIn("503", figures["last-error"])

    def test_stopLeavesNoTimers(self) -> None:
        """Stopping the mirrors cancels the probe timer of an offline mirror."""
        self.goOffline()
        self.assertTrue(self.h.clock.getDelayedCalls())
        self.h.stop()
        self.assertEqual(self.h.clock.getDelayedCalls(), [])


class _FileCase(_MirrorCase):
    """Helpers for file requests."""

    def url(self, filename: str | None = None, project: str = "demo-pkg") -> str:
        return self.h.mirrorFileURL(project, filename or self.sdistName)

    def path(self, filename: str | None = None, project: str = "demo-pkg") -> str:
        return urlsplit(self.url(filename, project)).path

    def fileGets(self, filename: str | None = None) -> int:
        return self.h.fileRequests().count(f"/files/{filename or self.sdistName}")

    def assertNotStored(self, data: bytes, filename: str | None = None) -> None:
        self.assertIsNone(self.h.storedEntry("demo-pkg", filename or self.sdistName))
        self.assertNotIn(hashlib.sha256(data).hexdigest(), self.h.blobs.blobs)
        self.assertEqual(self.h.mirrors._running, {})

    def slow(self) -> None:
        """Upstream sends files 1 KiB a second."""
        self.fake.slowFiles = True
        self.fake.slowChunkSize = 1024
        self.fake.slowChunkDelay = 1.0

    def runClock(self, seconds: int) -> None:
        for _ in range(seconds):
            self.h.clock.advance(1)
            for _ in range(5):
                self.h.pump()


class FileTests(_FileCase):
    """Files are fetched on first request, streamed, verified, stored, and then served from disk."""

    def test_fetchedAndStored(self) -> None:
        """The first request gets upstream's bytes, which are then stored under their sha256."""
        answer = self.h.get(self.url())
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, self.sdist)
        self.assertEqual(answer.header("Content-Type"), "application/gzip")
        self.assertIsNone(answer.header("Content-Encoding") or None)
        sha = hashlib.sha256(self.sdist).hexdigest()
        self.assertEqual(self.h.blobs.blobs[sha], self.sdist)
        entry = self.h.storedEntry("demo-pkg", self.sdistName)
        self.assertEqual((entry["sha256"], entry["size"], entry["yanked"]), (sha, len(self.sdist), "broken"))
        self.assertEqual(self.fileGets(), 1)

    def test_servedFromDisk(self) -> None:
        """Later requests are served from disk like private files: ETag, Range, HEAD, 304."""
        self.h.get(self.url())
        sha = hashlib.sha256(self.sdist).hexdigest()
        answer = self.h.get(self.url())
        self.assertEqual(answer.body, self.sdist)
        self.assertEqual(answer.header("ETag"), f'"{sha}"')
        self.assertEqual(answer.header("Accept-Ranges"), "bytes")
        self.assertEqual(answer.header("Cache-Control"), "max-age=365000000, immutable, public")
        ranged = self.h.get(self.url(), {b"Range": [b"bytes=100-199"]})
        self.assertEqual(ranged.code, 206)
        self.assertEqual(ranged.body, self.sdist[100:200])
        self.assertEqual(ranged.header("Content-Range"), f"bytes 100-199/{len(self.sdist)}")
        head = self.h.head(self.url())
        self.assertEqual((head.code, head.body), (200, b""))
        self.assertEqual(head.header("ETag"), f'"{sha}"')
        raw = self.h.raw(rawRequest(self.path(), method="HEAD"))
        self.assertEqual(raw.header("Content-Length"), str(len(self.sdist)))
        notModified = self.h.get(self.url(), {b"If-None-Match": [f'"{sha}"'.encode()]})
        self.assertEqual(notModified.code, 304)
        self.assertEqual(self.fileGets(), 1)

    def test_servedWhileUpstreamDown(self) -> None:
        """A stored file is served when upstream is down and the mirror offline."""
        self.h.get(self.url())
        self.goOffline()
        answer = self.h.get(self.url())
        self.assertEqual(answer.body, self.sdist)

    def test_headUncached(self) -> None:
        """HEAD on a file not stored yet answers from the page, without fetching the file."""
        url = self.url()
        answer = self.h.raw(rawRequest(urlsplit(url).path, method="HEAD"))
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Length"), str(len(self.sdist)))
        self.assertEqual(self.fileGets(), 0)

    def test_streamedBeforeComplete(self) -> None:
        """The client gets the first bytes before upstream has sent the last ones."""
        self.slow()
        client = RawClient(self.h, rawRequest(self.path()))
        self.runClock(3)
        self.assertIn(b"200 OK", client.received())
        self.assertIn(f"Content-Length: {len(self.sdist)}".encode(), client.received())
        partial = client.body()
        self.assertTrue(0 < len(partial) < len(self.sdist), len(partial))
        self.assertEqual(partial, self.sdist[:len(partial)])
        self.assertNotIn(hashlib.sha256(self.sdist).hexdigest(), self.h.blobs.blobs)
        self.runClock(10)
        self.assertEqual(client.body(), self.sdist)
        self.assertFalse(client.aborted)
        self.assertIsNotNone(self.h.storedEntry("demo-pkg", self.sdistName))

    def test_hashMismatch(self) -> None:
        """Bytes that do not match the advertised hash are not stored, the client connection is aborted, and it is logged."""
        url = self.url()
        self.fake.corruptFiles = True
        with capturedLogs() as events:
            client = RawClient(self.h, rawRequest(urlsplit(url).path))
            for _ in range(50):
                self.h.pump()
        self.assertTrue(client.aborted)
        self.assertLess(len(client.body()), len(self.sdist))
        self.assertNotStored(bytes(b ^ 0x5A for b in self.sdist))
        self.assertNotStored(self.sdist)
        errors = [e for e in events if e["log_level"] == LogLevel.error and "hash mismatch" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["filename"], self.sdistName)
        self.fake.corruptFiles = False
        self.assertEqual(self.h.get(url).body, self.sdist)
        self.assertEqual(self.fileGets(), 2)

    def test_hashMismatchWaitingClient(self) -> None:
        """A client that waited for a transfer that failed verification gets a 502, not the bytes."""
        self.slow()
        self.fake.corruptFiles = True
        first = RawClient(self.h, rawRequest(self.path()))
        self.runClock(2)
        second = self.h.begin("GET", self.url())
        self.runClock(12)
        self.assertTrue(first.aborted)
        answer = self.successResultOf(second)
        self.assertEqual(answer.code, 502)
        self.assertIn("does not match", answer.json["message"])
        self.assertEqual(self.fileGets(), 1)

    def test_truncated(self) -> None:
        """A transfer that breaks off leaves nothing behind, and the next request fetches again."""
        url = self.url()
        self.fake.truncateFiles = True
        client = RawClient(self.h, rawRequest(urlsplit(url).path))
        for _ in range(50):
            self.h.pump()
        self.assertTrue(client.aborted)
        self.assertLess(len(client.body()), len(self.sdist))
        self.assertNotStored(self.sdist)
        self.assertEqual(self.h.blobs.blobs, {})
        self.fake.truncateFiles = False
        self.assertEqual(self.h.get(url).body, self.sdist)
        self.assertEqual(self.fileGets(), 2)

    def test_concurrentShareOneTransfer(self) -> None:
        """Two clients asking at once share one upstream transfer and both get every byte."""
        self.slow()
        path = self.path()
        first = RawClient(self.h, rawRequest(path))
        second = RawClient(self.h, rawRequest(path))
        self.runClock(12)
        self.assertEqual(first.body(), self.sdist)
        self.assertEqual(second.body(), self.sdist)
        self.assertEqual(self.fileGets(), 1)

    def test_lateClientWaitsForStoredCopy(self) -> None:
        """A client that arrives mid-transfer gets the stored copy, without a second transfer."""
        self.slow()
        first = RawClient(self.h, rawRequest(self.path()))
        self.runClock(3)
        late = self.h.begin("GET", self.url())
        self.assertNoResult(late)
        self.runClock(10)
        self.assertEqual(first.body(), self.sdist)
        answer = self.successResultOf(late)
        self.assertEqual(answer.body, self.sdist)
        self.assertEqual(answer.header("ETag"), f'"{hashlib.sha256(self.sdist).hexdigest()}"')
        self.assertEqual(self.fileGets(), 1)

    def test_disconnectDoesNotStopOthers(self) -> None:
        """A client that disconnects mid-transfer does not stop it for another client or the cache."""
        self.slow()
        path = self.path()
        first = RawClient(self.h, rawRequest(path))
        second = RawClient(self.h, rawRequest(path))
        self.runClock(3)
        first.disconnect()
        self.runClock(10)
        self.assertLess(len(first.body()), len(self.sdist))
        self.assertEqual(second.body(), self.sdist)
        self.assertIsNotNone(self.h.storedEntry("demo-pkg", self.sdistName))
        self.assertEqual(self.fileGets(), 1)

    def test_onlyClientDisconnects(self) -> None:
        """When the only client goes away mid-transfer, the file is still stored."""
        self.slow()
        client = RawClient(self.h, rawRequest(self.path()))
        self.runClock(3)
        client.disconnect()
        self.runClock(10)
        self.assertIsNotNone(self.h.storedEntry("demo-pkg", self.sdistName))
        self.assertEqual(self.h.get(self.url()).body, self.sdist)
        self.assertEqual(self.fileGets(), 1)

    def test_disconnectBeforeHeaders(self) -> None:
        """A client that goes away while upstream has not answered yet does not cancel the fetch."""
        client = RawClient(self.h, rawRequest(self.path()))
        client.disconnect()
        for _ in range(50):
            self.h.pump()
        self.assertIsNotNone(self.h.storedEntry("demo-pkg", self.sdistName))
        self.assertEqual(self.fileGets(), 1)

    def test_slowClientPausesUpstream(self) -> None:
        """A live client that cannot keep up pauses the upstream transfer until it catches up."""
        self.slow()
        client = RawClient(self.h, rawRequest(self.path()))
        self.runClock(2)
        (fetch,) = self.h.mirrors._running.values()
        calls: list[str] = []
        self.patch(fetch.transport, "pauseProducing", lambda: calls.append("pause"))
        self.patch(fetch.transport, "resumeProducing", lambda: calls.append("resume"))
        client.transport.producer.pauseProducing()
        self.assertEqual(calls, ["pause"])
        self.runClock(1)
        self.assertEqual(calls, ["pause"])
        client.transport.producer.resumeProducing()
        self.assertEqual(calls[:2], ["pause", "resume"])
        self.runClock(10)
        self.assertEqual(client.body(), self.sdist)

    def test_stalledClientDropped(self) -> None:
        """A client that keeps the transfer paused past the idle timeout is dropped; the others and the cache go on."""
        self.slow()
        path = self.path()
        stalled = RawClient(self.h, rawRequest(path))
        other = RawClient(self.h, rawRequest(path))
        self.runClock(2)
        stalled.transport.producer.pauseProducing()
        with capturedLogs() as events:
            # Upstream honours the pause (the in-memory connection does not,
            # so it is simply not pumped): nothing arrives for a while.
            for _ in range(int(TIMEOUT * 6) + 1):
                self.h.clock.advance(1)
            self.assertTrue(stalled.aborted)
            self.assertFalse(other.aborted)
            self.runClock(12)
        self.assertTrue(stalled.aborted)
        self.assertFalse(other.aborted)
        self.assertEqual(other.body(), self.sdist)
        self.assertIsNotNone(self.h.storedEntry("demo-pkg", self.sdistName))
        self.assertEqual(len([e for e in events if "dropping a client" in e["log_format"]]), 1)

    def test_externalURLs(self) -> None:
        """With mirror_use_external_urls an uncached file redirects to upstream."""
        self.h.modifyIndex("root", "pypi", {"mirror_use_external_urls": True}, auth=self.h.root)
        answer = self.h.get(self.url())
        self.assertEqual(answer.code, 302)
        self.assertEqual(answer.header("Location"), f"http://upstream.test/files/{self.sdistName}")
        self.assertEqual(self.fileGets(), 0)

    def test_directURL(self) -> None:
        """A file URL requested before its page was seen (uv lock files) is found upstream."""
        sha = hashlib.sha256(self.wheel).hexdigest()
        answer = self.h.get(f"/root/pypi/+f/{sha[:3]}/{sha[3:16]}/{self.wheelName}")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, self.wheel)

    def test_wrongHashPath(self) -> None:
        """A known file name under a hash path it does not have is 404, and nothing is fetched."""
        self.page()
        answer = self.h.get(f"/root/pypi/+f/000/0000000000000/{self.sdistName}")
        self.assertEqual(answer.code, 404)
        self.assertEqual(self.fileGets(), 0)

    def test_offlineUncached(self) -> None:
        """Offline, a file that is not stored is a 502 at once, without asking upstream."""
        url = self.url()
        self.goOffline()
        before = len(self.fake.requests)
        answer = self.h.get(url)
        self.assertEqual(answer.code, 502)
        self.assertIn("not cached", answer.json["message"])
        self.assertEqual(len(self.fake.requests), before)

    def test_upstreamError(self) -> None:
        """A file upstream fails to serve is a 502 and counts as an upstream failure."""
        url = self.url()
        self.fake.down = True
        answer = self.h.get(url)
        self.assertEqual(answer.code, 502)
        self.assertEqual(self.h.status()["consecutive-failures"], 1)

    def test_upstream404(self) -> None:
        """A listed file upstream no longer has is a 404 and does not count as an upstream failure."""
        url = self.url()
        self.fake.removeFile("Demo.Pkg", self.sdistName)
        answer = self.h.get(url)
        self.assertEqual(answer.code, 404)
        self.assertEqual(self.h.status()["consecutive-failures"], 0)

    def test_headerTimeout(self) -> None:
        """An upstream that does not start answering a file within the timeout gives a 502."""
        url = self.url()
        self.fake.hang = True
        d = self.h.begin("GET", url)
        self.assertNoResult(d)
        self.h.clock.advance(TIMEOUT)
        answer = self.h.settle(d)
        self.assertEqual(answer.code, 502)
        self.assertEqual(self.h.mirrors._running, {})

    def test_idleTimeout(self) -> None:
        """A transfer that stalls longer than the idle timeout is dropped and nothing is stored."""
        self.slow()
        self.fake.slowChunkDelay = TIMEOUT * 6 + 10
        client = RawClient(self.h, rawRequest(self.path()))
        for _ in range(20):
            self.h.pump()
        self.runClock(int(TIMEOUT * 6) + 1)
        self.assertTrue(client.aborted)
        self.assertNotStored(self.sdist)

    def test_requestWhileRecording(self) -> None:
        """A request that finds the transfer finished but not yet recorded gets the file."""
        url = self.url()
        write = self.h.storage.write

        def slowWrite(function: Any) -> Deferred:
            d: Deferred = Deferred()
            self.h.clock.callLater(1, lambda: write(function).chainDeferred(d))
            return d

        self.patch(self.h.storage, "write", slowWrite)
        first = self.h.begin("GET", url)
        self.assertEqual(self.successResultOf(first).body, self.sdist)
        self.assertEqual(len(self.h.mirrors._running), 1)
        second = self.h.begin("GET", url)
        self.assertEqual(self.successResultOf(second).body, self.sdist)
        self.h.clock.advance(1)
        self.assertEqual(self.h.mirrors._running, {})
        self.assertIsNotNone(self.h.storedEntry("demo-pkg", self.sdistName))
        self.assertEqual(self.fileGets(), 1)


class MetadataTests(_FileCase):
    """C{.metadata} files are fetched when advertised, verified and cached."""

    def test_fetchedAndCached(self) -> None:
        """The .metadata of an upstream wheel is served, then answered from the cache."""
        url = self.url(self.wheelName) + ".metadata"
        answer = self.h.get(url)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, self.metadata)
        self.assertEqual(answer.header("ETag"), f'"{hashlib.sha256(self.metadata).hexdigest()}"')
        self.assertEqual(self.h.get(url).body, self.metadata)
        self.assertEqual(self.fileGets(self.wheelName + ".metadata"), 1)
        self.assertEqual(self.fileGets(self.wheelName), 0)

    def test_afterFileStored(self) -> None:
        """Once the wheel is stored its .metadata is still served."""
        self.h.get(self.url(self.wheelName))
        answer = self.h.get(self.url(self.wheelName) + ".metadata")
        self.assertEqual(answer.body, self.metadata)
        self.fake.down = True
        self.assertEqual(self.h.get(self.url(self.wheelName) + ".metadata").body, self.metadata)

    def test_verified(self) -> None:
        """A .metadata file that does not match its advertised hash is refused and not cached."""
        url = self.url(self.wheelName) + ".metadata"
        self.fake.corruptFiles = True
        answer = self.h.get(url)
        self.assertEqual(answer.code, 502)
        self.assertIsNone(self.successResultOf(self.h.storage.read(lambda view: view.get(
            keys.coreMetadataKey("root", "pypi", "demo-pkg", self.wheelName)))))
        self.fake.corruptFiles = False
        self.assertEqual(self.h.get(url).body, self.metadata)

    def test_notAdvertised(self) -> None:
        """A file whose page advertises no .metadata has none, and upstream is not asked."""
        answer = self.h.get(self.url(self.sdistName) + ".metadata")
        self.assertEqual(answer.code, 404)
        self.assertEqual(self.fileGets(self.sdistName + ".metadata"), 0)

    def test_offlineCached(self) -> None:
        """A cached .metadata is served while the mirror is offline."""
        url = self.url(self.wheelName) + ".metadata"
        self.h.get(url)
        self.goOffline()
        self.assertEqual(self.h.get(url).body, self.metadata)


class OfflineModeTests(_MirrorCase):
    """C{--offline-mode}: never a request upstream; pages list only stored files."""

    def setUp(self) -> None:
        super().setUp()
        self.h.get(self.h.mirrorFileURL("demo-pkg", self.wheelName))
        self.h.restart(offlineMode=True)
        del self.fake.requests[:]

    def test_onlyStoredFiles(self) -> None:
        """The page lists the stored wheel, not the sdist that was never fetched."""
        self.assertEqual(self.filenames(), [self.wheelName])
        parsed = PageParser(self.h.simpleHTML("root/pypi", "demo-pkg").text)
        self.assertEqual([text for _, text in parsed.links], [self.wheelName])
        self.assertEqual(self.fake.requests, [])

    def test_everyLinkWhileFilesAreElsewhere(self) -> None:
        """A replica's mirrors list every cached link while its primary can serve the missing files."""
        primaryAnswers = [True]
        self.h.restart(offlineMode=True, filesElsewhere=lambda: primaryAnswers[0])
        self.assertEqual(sorted(self.filenames()), sorted([self.wheelName, self.sdistName]))
        primaryAnswers[0] = False
        self.h.pages.invalidateAll()
        self.assertEqual(self.filenames(), [self.wheelName])
        self.assertEqual(self.fake.requests, [])

    def test_storedFileServed(self) -> None:
        """The stored wheel is served."""
        self.assertEqual(self.h.get(self.h.mirrorFileURL("demo-pkg", self.wheelName)).body, self.wheel)
        self.assertEqual(self.fake.requests, [])

    def test_noUpstreamAfterExpiry(self) -> None:
        """Even after the expiry nothing goes upstream."""
        self.expire()
        self.assertEqual(self.filenames(), [self.wheelName])
        self.assertEqual(self.fake.requests, [])

    def test_uncachedProject(self) -> None:
        """A project never fetched is not found, without asking upstream."""
        self.assertEqual(self.h.mirrorPage("other").code, 404)
        self.assertEqual(self.fake.requests, [])

    def test_uncachedFile(self) -> None:
        """A listed-upstream file that was never stored is not fetched."""
        sha = hashlib.sha256(self.sdist).hexdigest()
        answer = self.h.get(f"/root/pypi/+f/{sha[:3]}/{sha[3:16]}/{self.sdistName}")
        self.assertIn(answer.code, (404, 502))
        self.assertEqual(self.fake.requests, [])

    def test_storedListNotUsed(self) -> None:
        """Upstream's stored list is not offered; only the names with cached pages are listed."""
        self.h.restart()
        self.fake.addFile("other", "other-1.0.tar.gz", b"x")
        self.assertEqual(self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]}).code, 200)
        self.h.restart(offlineMode=True)
        del self.fake.requests[:]
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo-pkg"])
        self.assertEqual(self.fake.requests, [])

    def test_projectList(self) -> None:
        """The project list holds the known names and nothing is asked upstream."""
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(answer.code, 200)
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo-pkg"])
        self.assertEqual(self.fake.requests, [])


class PrivateNameTests(_MirrorCase):
    """A private index never asks upstream about, or shows upstream releases of, its own projects."""

    def setUp(self) -> None:
        super().setUp()
        self.h.createIndex("alice", "dev", bases=["root/pypi"])
        self.h.createIndex("alice", "staging", bases=["alice/dev", "root/pypi"])
        self.private = buildPrivateWheel("secretpkg", "1.0")
        self.h.mustUpload("alice/dev", self.private)
        self.h.addWheel("secretpkg", "99.0")

    def secretAsked(self) -> bool:
        return any("secretpkg" in path for path in self.h.upstreamPaths())

    def test_neverAsked(self) -> None:
        """JSON, HTML and installer requests for a private project never reach upstream."""
        for stage in ("alice/dev", "alice/staging"):
            self.assertEqual(self.filenames("secretpkg", stage), [self.private.filename])
            self.h.simpleHTML(stage, "secretpkg")
            answer = self.h.get(f"/{stage}/+simple/secretpkg/", {b"User-Agent": [PIP_AGENT],
                                                                 b"Accept": [UV_ACCEPT]})
            self.assertEqual([f["filename"] for f in answer.json["files"]], [self.private.filename])
            self.assertEqual(self.h.get(f"/{stage}/secretpkg", JSON_ACCEPT).code, 200)
        self.expire()
        self.assertEqual(self.filenames("secretpkg", "alice/staging"), [self.private.filename])
        self.assertFalse(self.secretAsked(), self.h.upstreamPaths())

    def test_otherProjectsMerged(self) -> None:
        """Projects the private indexes do not hold come from the mirror, linked to its file routes."""
        files = self.h.mirrorFiles("demo-pkg", "alice/dev")
        self.assertEqual(sorted(files), sorted([self.wheelName, self.sdistName]))
        url = urljoin(f"{BASE}/alice/dev/+simple/demo-pkg/", files[self.wheelName]["url"])
        self.assertTrue(urlsplit(url).path.startswith("/root/pypi/+f/"), url)
        self.assertEqual(self.h.get(url).body, self.wheel)
        self.assertFalse(self.secretAsked())

    def test_whitelisted(self) -> None:
        """With mirror_whitelist naming it, upstream is asked and its releases are merged."""
        self.h.modifyIndex("alice", "dev", {"mirror_whitelist": ["secretpkg"]})
        self.assertEqual(self.filenames("secretpkg", "alice/dev"),
                         sorted([self.private.filename, "secretpkg-99.0-py3-none-any.whl"]))
        self.assertTrue(self.secretAsked())

    def test_projectListOnce(self) -> None:
        """The private index's project list names a project both sides have once."""
        answer = self.h.get("/alice/dev/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(answer.code, 200)
        names = [p["name"] for p in answer.json["projects"]]
        self.assertEqual(names.count("secretpkg"), 1)
        self.assertIn("Demo.Pkg", names)
        self.assertFalse(self.secretAsked())


class ProjectListTests(_MirrorCase):
    """The project list is streamed from a file of upstream's names."""

    def addMany(self, count: int) -> list[str]:
        names = [f"project-{n:05d}" for n in range(count)]
        for name in names:
            self.fake.addFile(name, f"{name}-1.0.tar.gz", b"x")
        return names

    def test_manyNames(self) -> None:
        """Thousands of upstream names are listed, in JSON and in HTML, from a stored names file."""
        names = self.addMany(3000)
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), JSON_TYPE)
        listed = [p["name"] for p in answer.json["projects"]]
        self.assertEqual(sorted(listed), sorted(names + ["Demo.Pkg"]))
        html = self.h.get("/root/pypi/+simple/")
        self.assertEqual(html.code, 200)
        self.assertEqual(len(PageParser(html.text).links), 3001)
        stored = self.successResultOf(self.h.storage.read(lambda view: view.get("mirrornames/root/pypi")))
        self.assertEqual(stored["count"], 3001)
        self.assertEqual(self.h.upstreamPaths().count("/simple/"), 1)

    def test_refreshedAfterExpiry(self) -> None:
        """After the expiry the list is fetched again (revalidated with its ETag)."""
        self.fake.etags = True
        self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.expire()
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["Demo.Pkg"])
        lists = [headers for path, headers in self.h.upstreamHeaders if path == "/simple/"]
        self.assertEqual(len(lists), 2)
        self.assertIn(b"if-none-match", lists[1])
        self.fake.addFile("newcomer", "newcomer-1.0.tar.gz", b"x")
        self.expire()
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(sorted(p["name"] for p in answer.json["projects"]), ["Demo.Pkg", "newcomer"])

    def test_upstreamDownKeepsList(self) -> None:
        """When upstream fails, the last list is served."""
        self.addMany(10)
        self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.expire()
        self.fake.down = True
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(len(answer.json["projects"]), 11)

    def test_noListKnownNames(self) -> None:
        """Without any list from upstream, the names with cached pages are listed."""
        self.page()
        self.fake.down = True
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual(answer.code, 200)
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo-pkg"])

    def test_mirrorNoProjectList(self) -> None:
        """With mirror_no_project_list upstream's list is never fetched; cached names are listed."""
        self.h.modifyIndex("root", "pypi", {"mirror_no_project_list": True}, auth=self.h.root)
        self.page()
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo-pkg"])
        self.assertNotIn("/simple/", self.h.upstreamPaths())

    def test_mirrorNoProjectListAfterList(self) -> None:
        """Setting mirror_no_project_list after a list was fetched stops listing upstream's names."""
        self.addMany(5)
        self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.h.modifyIndex("root", "pypi", {"mirror_no_project_list": True}, auth=self.h.root)
        self.page()
        answer = self.h.get("/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo-pkg"])

    def test_listHeaderTimeout(self) -> None:
        """A list upstream does not answer is given up after the timeout; the known names stand in."""
        self.page()
        self.fake.hang = True
        d = self.h.begin("GET", "/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.h.clock.advance(TIMEOUT)
        answer = self.h.settle(d)
        self.assertEqual(answer.code, 200)
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo-pkg"])

    def test_listIdleTimeout(self) -> None:
        """A list whose body stalls is given up after the idle timeout; the known names stand in."""
        self.page()
        self.h.recording.stall.add("/simple/")
        d = self.h.begin("GET", "/root/pypi/+simple/", {b"Accept": [PIP_ACCEPT]})
        self.h.clock.advance(TIMEOUT)
        self.h.pump()
        self.assertNoResult(d)
        self.h.clock.advance(TIMEOUT * 6)
        answer = self.h.settle(d)
        self.assertEqual(answer.code, 200)
        self.assertEqual([p["name"] for p in answer.json["projects"]], ["demo-pkg"])


class CredentialTests(SynchronousTestCase):
    """Credentials in mirror_url are sent as a header and never logged or shown."""

    def setUp(self) -> None:
        with capturedLogs() as self.events:
            self.h = MirrorHarness(self, mirrorURL="http://mirroruser:s3cr%40t@upstream.test/simple/")
            self.wheelName, self.wheel, _ = self.h.addWheel("demo-pkg", "1.0")

    def test_sentAsHeader(self) -> None:
        """Page, file and .metadata requests to upstream carry the credentials as Basic auth."""
        with capturedLogs() as events:
            url = self.h.mirrorFileURL("demo-pkg", self.wheelName)
            self.assertEqual(self.h.get(url).body, self.wheel)
            self.assertEqual(self.h.get(url + ".metadata").code, 200)
        expected = b"Basic " + base64.b64encode(b"mirroruser:s3cr@t")
        self.assertEqual(len(self.h.upstreamHeaders), 3)
        for path, headers in self.h.upstreamHeaders:
            self.assertEqual(headers.get(b"authorization"), [expected], path)
        self.assertNotIn("s3cr", repr(list(events)))

    def test_otherHostsGetNone(self) -> None:
        """Files on another host (a CDN) are fetched without the mirror's credentials."""
        from devpi_twisted.mirror.upstream import credentialsFor

        mirror = "https://u:p@index.example/simple/"
        self.assertIsNone(credentialsFor("https://files.example/x.whl", mirror))
        self.assertIsNone(credentialsFor("http://index.example/x.whl", mirror))
        self.assertIsNone(credentialsFor("https://index.example/x.whl", "https://index.example/simple/"))
        self.assertEqual(credentialsFor("https://index.example:443/f/x.whl", mirror),
                         b"Basic " + base64.b64encode(b"u:p"))

    def test_notInErrors(self) -> None:
        """Errors shown to clients and logged name upstream without the credentials."""
        self.h.fake.down = True
        with capturedLogs() as events:
            answer = self.h.mirrorPage("demo-pkg")
        self.assertEqual(answer.code, 502)
        self.assertIn("upstream.test", answer.json["message"])
        self.assertNotIn("s3cr", answer.text)
        self.assertNotIn("mirroruser", answer.text)
        self.assertTrue(events)
        self.assertNotIn("s3cr", repr(list(events)))
        self.assertNotIn("s3cr", repr(self.h.status()))


class FileFetchTests(SynchronousTestCase):
    """L{FileFetch} on its own: how a transfer ends."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from devpi_twisted.testing import MemoryBlobStore

        self.clock = Clock()
        self.blobs = MemoryBlobStore()
        self.data = b"wheel bytes " * 100

    def fetch(self, **linkOptions: Any) -> Any:
        from twisted.internet.testing import StringTransport

        from devpi_twisted.mirror.files import FileFetch
        from devpi_twisted.model.upstream.common import UpstreamLink

        options: dict[str, Any] = {
            "filename": "pkg-1.0.tar.gz", "url": "https://upstream.test/files/pkg-1.0.tar.gz",
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "hashes": {"sha256": hashlib.sha256(self.data).hexdigest()}, "requiresPython": None,
            "yanked": False, "size": None, "uploadTime": None, "coreMetadata": False,
            "provenance": None, "version": "1.0",
        }
        options.update(linkOptions)
        fetch = FileFetch(UpstreamLink(**options), self.blobs.openWriter(), self.clock, 30.0)
        fetch.makeConnection(StringTransport())
        return fetch

    def test_endWithoutLength(self) -> None:
        """A body without a length that ends with the connection is kept when its hash matches."""
        from twisted.web.http import PotentialDataLoss

        fetch = self.fetch()
        fetch.dataReceived(self.data)
        fetch.connectionLost(Failure(PotentialDataLoss()))
        fetched = self.successResultOf(fetch.result)
        self.assertEqual(self.blobs.blobs[fetched.blob.sha256], self.data)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_endWithoutLengthUnverifiable(self) -> None:
        """Without a hash or a size, a body that may have been cut short is not kept."""
        from twisted.web.http import PotentialDataLoss

        fetch = self.fetch(sha256=None, hashes={})
        fetch.dataReceived(self.data)
        fetch.connectionLost(Failure(PotentialDataLoss()))
        self.failureResultOf(fetch.result)
        self.assertEqual(self.blobs.blobs, {})

    def test_sizeChecked(self) -> None:
        """A body shorter than the advertised size is not kept, even without a hash."""
        from twisted.web.client import ResponseDone

        fetch = self.fetch(sha256=None, hashes={}, size=len(self.data) + 1)
        fetch.dataReceived(self.data)
        fetch.connectionLost(Failure(ResponseDone()))
        failure = self.failureResultOf(fetch.result)
        self.assertIn("expected", failure.getErrorMessage())
        self.assertEqual(self.blobs.blobs, {})

    def test_waitAfterEnd(self) -> None:
        """Waiting on a transfer that has already ended gives its outcome at once."""
        from twisted.web.client import ResponseDone

        fetch = self.fetch()
        fetch.dataReceived(self.data)
        fetch.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(fetch.waitForResult()).blob.size, len(self.data))

    def test_otherHashesChecked(self) -> None:
        """An advertised md5 is checked besides the sha256, and a mismatch keeps nothing."""
        from twisted.web.client import ResponseDone

        fetch = self.fetch(hashes={"sha256": hashlib.sha256(self.data).hexdigest(), "md5": "0" * 32})
        fetch.dataReceived(self.data)
        fetch.connectionLost(Failure(ResponseDone()))
        self.assertIn("md5", self.failureResultOf(fetch.result).getErrorMessage())
        self.assertEqual(self.blobs.blobs, {})

    def test_sha512Only(self) -> None:
        """A link with only a sha512 is verified by it."""
        from twisted.web.client import ResponseDone

        fetch = self.fetch(sha256=None, hashes={"sha512": hashlib.sha512(self.data).hexdigest()})
        fetch.dataReceived(self.data)
        fetch.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(fetch.result).blob.size, len(self.data))
