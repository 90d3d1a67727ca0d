"""
Storage that cannot be reached (issue 13, "Faults"): with the memory fakes
switched C{unavailable}, as the PostgreSQL and S3 backends fail, every
request that needs storage answers 503 with a JSON message and
C{Retry-After} (never a 500 or a traceback), pages already rendered keep
being served, a mirror does not blame upstream, an upload stores nothing,
and once the switch is off everything works again without a restart.
"""

from typing import Any

from twisted.internet.defer import fail
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.errors import StorageUnavailable
from devpi_twisted.model import keys
from devpi_twisted.services.auth import makeReplicationToken, replicationKey
from devpi_twisted.testing import MemoryBlobStore, MemoryStorage
from devpi_twisted.web import errors as webErrors
from devpi_twisted.web.errors import OutageLog

from .distbuilder import buildWheel, uploadBody
from .mirrorharness import MirrorHarness
from .releaseharness import PIP_ACCEPT, combine

JSON = {b"Accept": [b"application/json"]}
SIMPLE = {b"Accept": [PIP_ACCEPT]}


def storedKeys(storage: MemoryStorage, prefix: str) -> list[str]:
    return [k for k in storage._state if k.startswith(prefix)]


class FakeSwitchTests(SynchronousTestCase):
    """The fakes' switch fails every operation as the real backends do, and recovers."""

    def test_storageOperationsFail(self) -> None:
        storage = MemoryStorage()
        self.successResultOf(storage.write(lambda txn: txn.set("a", 1)))
        storage.unavailable = True
        for d in (storage.read(lambda view: view.get("a")), storage.readAsOf(0, lambda view: None),
                  storage.write(lambda txn: txn.set("b", 2)), storage.changesSince(-1, 10),
                  storage.referencedBlobs(), storage.isBlobReferenced("x")):
            self.failureResultOf(d, StorageUnavailable)
        storage.unavailable = False
        self.assertEqual(self.successResultOf(storage.read(lambda view: (view.get("a"), view.get("b")))), (1, None))

    def test_blobOperationsFail(self) -> None:
        blobs = MemoryBlobStore()
        writer = blobs.openWriter()
        self.successResultOf(writer.write(b"data"))
        sha = self.successResultOf(writer.commit()).sha256
        reader = self.successResultOf(blobs.open(sha))
        blobs.unavailable = True
        self.failureResultOf(blobs.open(sha), StorageUnavailable)
        self.failureResultOf(blobs.exists(sha), StorageUnavailable)
        self.failureResultOf(reader.read(10), StorageUnavailable)  # an open reader too
        other = blobs.openWriter()
        self.failureResultOf(other.write(b"more"), StorageUnavailable)
        self.failureResultOf(other.commit(), StorageUnavailable)
        self.assertEqual(list(blobs.blobs), [sha])
        blobs.unavailable = False
        self.assertEqual(self.successResultOf(reader.read(10)), b"data")


class OutageLogTests(SynchronousTestCase):
    def test_oneLinePerInterval(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        now = [0.0]
        outage = OutageLog(interval=10, clock=lambda: now[0])

        class Request:
            method, path = b"GET", b"/x"

        for _ in range(5):
            outage.refused(Request(), StorageUnavailable())
        now[0] = 11
        outage.refused(Request(), StorageUnavailable())
        lines = [e for e in events if e.get("log_namespace") == "devpi_twisted.web.errors"]
        self.assertEqual([e["refusedBefore"] for e in lines], [0, 4])
        self.assertTrue(all(e["log_level"] == LogLevel.warn and "log_failure" not in e for e in lines))


class StorageFaultTests(SynchronousTestCase):
    """The whole server over the memory fakes, with a private index and a mirror."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.h = MirrorHarness(self)
        self.h.createIndex("alice", "dev", bases=["root/pypi"])
        self.wheel = buildWheel("priv-pkg", "1.0")
        self.h.mustUpload("alice/dev", self.wheel)
        self.privateURL = self.h.fileURL("alice/dev", "priv-pkg", self.wheel.filename)
        self.mirrored, self.mirroredData, _ = self.h.addWheel("mirrored", "2.0")
        self.mirrorURL = self.h.mirrorFileURL("mirrored", self.mirrored)

    def down(self, storage: bool = True, blobs: bool = False) -> None:
        self.h.storage.unavailable = storage
        self.h.blobs.unavailable = blobs
        del self.events[:]

    def assertUnavailable(self, answer: Any) -> None:
        self.assertEqual(answer.code, 503, answer.body)
        self.assertEqual(answer.header("Content-Type"), "application/json")
        self.assertIn("unreachable", answer.json["message"])
        self.assertEqual(answer.header("Retry-After"), "2")
        self.assertNotIn(b"Traceback", answer.body)

    def assertNoTracebacks(self) -> None:
        failures = [e for e in self.events if "log_failure" in e or e["log_level"] >= LogLevel.error]
        self.assertEqual(failures, [])

    def requests(self) -> list[tuple[str, str, Any, Any]]:
        h = self.h
        return [
            ("GET", "/alice/dev/+simple/never-rendered/", SIMPLE, None),
            ("GET", "/alice/dev/priv-pkg", JSON, None),
            ("GET", "/alice/dev/priv-pkg/1.0", JSON, None),
            ("GET", self.privateURL, None, None),
            ("GET", self.mirrorURL, None, None),
            ("GET", "/root/pypi/+simple/other/", SIMPLE, None),
            ("POST", "/+login", JSON, {"user": "alice", "password": "alicepw"}),
            ("PUT", "/dave", JSON, {"password": "davepw"}),
            ("PUT", "/alice/new", combine(JSON, h.alice), {}),
            ("PATCH", "/alice/dev", combine(JSON, h.alice), {"title": "x"}),
            ("DELETE", "/alice/dev/priv-pkg/1.0", combine(JSON, h.alice), None),
            ("GET", "/alice/dev/+api", JSON, None),
            ("GET", "/", JSON, None),
            ("GET", "/alice", JSON, None),
            ("GET", "/alice/dev", JSON, None),
        ]

    def test_everyKindOfRequestAnswers503(self) -> None:
        """... and the refusals are logged in one warning line, not a traceback each."""
        self.patch(webErrors, "outageLog", OutageLog(clock=self.h.clock.seconds))
        for storage, blobs in ((True, True), (True, False)):
            self.down(storage, blobs)
            for method, path, headers, body in self.requests():
                answer = self.h.request(method, path, headers, json=body)
                self.assertUnavailable(answer)
            self.assertNoTracebacks()
            refusals = [e for e in self.events if e.get("log_namespace") == "devpi_twisted.web.errors"]
            self.assertEqual(len(refusals), 1 if storage and blobs else 0)

    def test_uploadAnswers503AndStoresNothing(self) -> None:
        second = buildWheel("priv-pkg", "2.0")
        for storage, blobs in ((True, False), (False, True), (True, True)):
            self.down(storage, blobs)
            blobsBefore = set(self.h.blobs.blobs)
            answer = self.h.upload("alice/dev", second)
            self.assertUnavailable(answer)
            self.h.storage.unavailable = False
            self.assertEqual(storedKeys(self.h.storage, keys.filesPrefix("alice", "dev", "priv-pkg")),
                             [keys.fileKey("alice", "dev", "priv-pkg", self.wheel.filename)])
            # An object written before the metadata failed is not referenced.
            referenced = self.successResultOf(self.h.storage.referencedBlobs())
            self.assertNotIn(second.sha256, referenced)
            self.assertTrue(set(self.h.blobs.blobs) - blobsBefore <= {second.sha256})
            self.assertNoTracebacks()
        self.down(False, False)
        self.h.mustUpload("alice/dev", second)

    def test_uploadThroughTheSiteGate(self) -> None:
        """The site's body gate reads storage before the body: 503 with Retry-After from there too."""
        self.down(True, False)
        upload = uploadBody(buildWheel("priv-pkg", "3.0"))
        # Chunked, so the gate decides before the body (as for a large one).
        head = [b"POST /alice/dev/ HTTP/1.1", b"Host: devpi.test", b"Connection: close",
                b"Transfer-Encoding: chunked"]
        for name, values in combine(upload.headers, self.h.alice).items():
            head += [name + b": " + value for value in values]
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(upload.body), upload.body)
        answer = self.h.raw(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.header("Retry-After"), "2")
        self.assertIn(b"unreachable", answer.body)
        self.assertNoTracebacks()

    def test_changelogFeedAndBlobs(self) -> None:
        """A replica's requests get the same 503 (it retries), the blob feed too."""
        token = makeReplicationToken(replicationKey(b"k" * 48), self.h.clock.seconds())
        credential = {b"Authorization": [b"Bearer " + token.encode("ascii")]}
        self.assertEqual(self.h.get("/+changelog/0-", credential).code, 200)
        self.down(True, True)
        self.assertUnavailable(self.h.get("/+changelog/0-", credential))
        self.assertUnavailable(self.h.get(f"/+blob/{self.wheel.sha256}", credential))
        self.assertNoTracebacks()

    def test_cachedPagesStillServed(self) -> None:
        h = self.h
        pages = ["/alice/dev/+simple/priv-pkg/", "/alice/dev/+simple/mirrored/", "/root/pypi/+simple/mirrored/",
                 "/alice/dev/+simple/", "/root/pypi/+simple/"]
        before = {}
        for _ in range(2):  # the first rendering of a mirror page records its links, and is not kept
            for page in pages:
                answer = h.get(page, SIMPLE)
                self.assertEqual(answer.code, 200, answer.body)
                before[page] = answer.body
        self.down(True, True)
        for page in pages:
            answer = h.get(page, SIMPLE)
            self.assertEqual((answer.code, answer.body), (200, before[page]), page)
        # Past the mirror's freshness the kept pages are still the best answer.
        h.clock.advance(4000)
        for page in pages:
            answer = h.get(page, SIMPLE)
            self.assertEqual((answer.code, answer.body), (200, before[page]), page)
        self.assertNoTracebacks()

    def test_cachedPageNotServedAcrossAnInvalidation(self) -> None:
        page = "/alice/dev/+simple/priv-pkg/"
        self.assertEqual(self.h.get(page, SIMPLE).code, 200)
        self.h.mustUpload("alice/dev", buildWheel("priv-pkg", "2.0"))  # drops the page
        self.down(True, False)
        self.assertUnavailable(self.h.get(page, SIMPLE))

    def test_knownFileServedWhileTheDatabaseIsDown(self) -> None:
        """A file answered before needs its blob only."""
        self.assertEqual(self.h.get(self.privateURL).body, self.wheel.data)
        self.down(True, False)
        answer = self.h.get(self.privateURL)
        self.assertEqual((answer.code, answer.body), (200, self.wheel.data))
        self.down(False, True)  # the bucket down: the routed way says 503
        self.assertUnavailable(self.h.get(self.privateURL))
        self.assertNoTracebacks()

    def test_backWithoutRestart(self) -> None:
        self.down(True, True)
        for method, path, headers, body in self.requests():
            self.h.request(method, path, headers, json=body)
        self.down(False, False)
        self.assertEqual(self.h.get(self.privateURL).body, self.wheel.data)
        self.assertEqual(self.h.get(self.mirrorURL).body, self.mirroredData)
        self.assertEqual(self.h.request("POST", "/+login", JSON, json={"user": "alice", "password": "alicepw"}).code,
                         200)
        self.assertEqual(self.h.request("PUT", "/dave", JSON, json={"password": "davepw"}).code, 201)
        self.assertEqual(self.h.get("/alice/dev/priv-pkg", JSON).code, 200)
        self.h.mustUpload("alice/dev", buildWheel("priv-pkg", "4.0"))
        self.assertIn("4.0", self.h.simpleJSON("alice/dev", "priv-pkg")["versions"])

    def test_mirrorBucketDownDoesNotBlameUpstream(self) -> None:
        self.down(False, True)
        answer = self.h.get(self.mirrorURL)
        self.assertUnavailable(answer)
        self.assertEqual(self.h.status()["state"], "online")
        self.assertIsNone(self.h.status()["last-error"])
        self.assertIsNone(self.h.storedEntry("mirrored", self.mirrored))
        self.assertNoTracebacks()
        self.down(False, False)
        self.assertEqual(self.h.get(self.mirrorURL).body, self.mirroredData)
        self.assertIsNotNone(self.h.storedEntry("mirrored", self.mirrored))

    def test_mirrorRecordFailsDoesNotBlameUpstream(self) -> None:
        """The file is verified and served; the database refusing its entry is logged in one line."""
        real = self.h.storage.write
        self.patch(self.h.storage, "write", lambda function: fail(StorageUnavailable()))
        del self.events[:]
        answer = self.h.get(self.mirrorURL)
        self.assertEqual((answer.code, answer.body), (200, self.mirroredData))
        self.assertEqual(self.h.status()["state"], "online")
        self.assertNoTracebacks()
        self.assertEqual(len([e for e in self.events if e["log_level"] == LogLevel.warn]), 1)
        self.h.storage.write = real  # type: ignore[method-assign]
        self.assertEqual(self.h.get(self.mirrorURL).body, self.mirroredData)
        self.assertIsNotNone(self.h.storedEntry("mirrored", self.mirrored))
