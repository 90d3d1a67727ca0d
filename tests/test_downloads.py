"""
Download records: every GET of a file (private or mirrored, whole or a
range; not a HEAD) is counted in memory and written in batches, one
transaction every few seconds at most and at stop, under keys of their own,
so that a page, its ETag and the file entries stay as they were.
"""

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model import keys
from devpi_twisted.services.downloads import FLUSH_SECONDS, DownloadCounter
from devpi_twisted.testing import MemoryStorage

from .distbuilder import buildWheel
from .mirrorharness import MirrorHarness
from .releaseharness import PIP_ACCEPT, ServerHarness


def record(storage: Any, user: str, index: str, project: str, filename: str) -> Any:
    box: list[Any] = []
    storage.read(lambda view: view.get(keys.downloadKey(user, index, project, filename))).addCallback(box.append)
    return box[0]


class DownloadCounterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.storage = MemoryStorage(clock=self.clock.seconds)
        self.counter = DownloadCounter(self.storage, self.clock)

    def test_batched(self) -> None:
        """Downloads wait in memory; one transaction writes all of them, FLUSH_SECONDS after the first."""
        serial = self.storage.currentSerial()
        self.counter.count("u", "i", "p", "p-1.whl")
        self.clock.advance(1)
        self.counter.count("u", "i", "p", "p-1.whl")
        self.counter.count("u", "i", "p", "p-2.whl")
        self.clock.advance(FLUSH_SECONDS - 1.5)
        self.assertEqual(self.storage.currentSerial(), serial)
        self.clock.advance(0.5)
        self.assertEqual(self.storage.currentSerial(), serial + 1)
        self.assertEqual(record(self.storage, "u", "i", "p", "p-1.whl"), {"last": 1001.0, "count": 2})
        self.assertEqual(record(self.storage, "u", "i", "p", "p-2.whl"), {"last": 1001.0, "count": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_addsToStored(self) -> None:
        key = keys.downloadKey("u", "i", "p", "p-1.whl")
        self.successResultOf(self.storage.write(lambda txn: txn.set(key, {"last": 5.0, "count": 7})))
        self.counter.count("u", "i", "p", "p-1.whl")
        self.successResultOf(self.counter.flushNow())
        self.assertEqual(record(self.storage, "u", "i", "p", "p-1.whl"), {"last": 1000.0, "count": 8})

    def test_writtenAtStop(self) -> None:
        self.counter.startService()
        self.counter.count("u", "i", "p", "p-1.whl")
        self.successResultOf(self.counter.stopService())
        self.assertEqual(record(self.storage, "u", "i", "p", "p-1.whl"), {"last": 1000.0, "count": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_storageDownKeepsCounts(self) -> None:
        """A flush that fails loses nothing: the counts go with the next one."""
        self.counter.startService()
        self.counter.count("u", "i", "p", "p-1.whl")
        self.storage.unavailable = True
        self.clock.advance(FLUSH_SECONDS)
        self.counter.count("u", "i", "p", "p-1.whl")
        self.storage.unavailable = False
        self.clock.advance(FLUSH_SECONDS)
        self.assertEqual(record(self.storage, "u", "i", "p", "p-1.whl"), {"last": 1005.0, "count": 2})
        self.flushLoggedErrors()

    def test_replicaWritesNothing(self) -> None:
        """On a replica (persist=False) nothing is written nor scheduled; listeners still hear."""
        counter = DownloadCounter(self.storage, self.clock, persist=False)
        heard: list[Any] = []
        counter.listen(lambda *args: heard.append(args))
        serial = self.storage.currentSerial()
        counter.count("u", "i", "p", "p-1.whl")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(counter.flushNow())
        self.assertEqual(self.storage.currentSerial(), serial)
        self.assertEqual(heard, [("u", "i", "p", "p-1.whl", 1000.0)])

    def test_transferring(self) -> None:
        """A blob is in use while any of its transfers runs, however it ends."""
        one: Deferred[None] = Deferred()
        two: Deferred[None] = Deferred()
        self.counter.transferring("a" * 64, one)
        self.counter.transferring("a" * 64, two)
        self.assertTrue(self.counter.isTransferring("a" * 64))
        one.callback(None)
        self.assertTrue(self.counter.isTransferring("a" * 64))
        two.errback(Exception("the client went away"))
        self.assertFalse(self.counter.isTransferring("a" * 64))
        self.assertFalse(self.counter.isTransferring("b" * 64))


class PrivateDownloadTests(SynchronousTestCase):
    """Files of a stage index, through the real web resource."""

    def setUp(self) -> None:
        self.h = ServerHarness(self)
        self.h.createIndex("alice", "dev")
        self.wheel = buildWheel("count-pkg", "1.0")
        self.h.mustUpload("alice/dev", self.wheel)
        self.url = self.h.fileURL("alice/dev", "count-pkg", self.wheel.filename)
        self.downloads = self.h.server.downloads

    def stored(self) -> Any:
        return record(self.h.storage, "alice", "dev", "count-pkg", self.wheel.filename)

    def test_getsCountedHeadNot(self) -> None:
        """GETs (whole or a range; the second one by the known-file shortcut) count; a HEAD does not."""
        self.assertEqual(self.h.get(self.url).body, self.wheel.data)
        self.assertEqual(self.h.get(self.url, {b"Range": [b"bytes=0-9"]}).code, 206)
        self.assertEqual(self.h.head(self.url).code, 200)
        self.assertEqual(self.h.get(self.url).code, 200)
        self.assertIsNone(self.stored())
        self.h.clock.advance(FLUSH_SECONDS)
        self.assertEqual(self.stored(), {"last": self.h.clock.seconds() - FLUSH_SECONDS, "count": 3})

    def test_fastPathCountsWithoutReading(self) -> None:
        """The known-file shortcut counts the download and reads no storage for it."""
        self.h.get(self.url)
        reads: list[Any] = []
        real = self.h.storage.read
        self.patch(self.h.storage, "read", lambda function: reads.append(function) or real(function))
        before = self.downloads.counted
        self.assertEqual(self.h.get(self.url).body, self.wheel.data)
        self.assertEqual(reads, [])
        self.assertEqual(self.downloads.counted, before + 1)
        self.successResultOf(self.downloads.flushNow())
        self.assertEqual(self.stored()["count"], 2)

    def test_transferHoldsTheBlob(self) -> None:
        """While a file is being sent its blob counts as in use; no longer once the answer is done."""
        sha = self.wheel.sha256
        gate: Deferred[None] = Deferred()
        realOpen = self.h.blobs.open

        def slowOpen(digest: str) -> Any:
            def slowReads(reader: Any) -> Any:
                read = reader.read
                reader.read = lambda size: gate.addCallback(lambda _: read(size))
                return reader

            return realOpen(digest).addCallback(slowReads)

        self.patch(self.h.blobs, "open", slowOpen)
        answer = self.h.treq.get(self.url)
        for _ in range(10):
            self.h.pump()
        self.assertTrue(self.downloads.isTransferring(sha))
        gate.callback(None)
        response = self.h.settle(answer)
        self.assertEqual(self.h.settle(response.content()), self.wheel.data)
        self.assertFalse(self.downloads.isTransferring(sha))

    def test_pagesUnchanged(self) -> None:
        """A flush of download records changes no page: the same ETag, a 304 to revalidation."""
        page = self.h.get("/alice/dev/+simple/count-pkg/", {b"Accept": [PIP_ACCEPT]})
        etag = page.header("ETag")
        serial = self.h.storage.currentSerial()
        self.h.get(self.url)
        self.h.clock.advance(FLUSH_SECONDS)
        self.assertEqual(self.h.storage.currentSerial(), serial + 1)
        again = self.h.get("/alice/dev/+simple/count-pkg/", {b"Accept": [PIP_ACCEPT]})
        self.assertEqual((again.header("ETag"), again.body), (etag, page.body))
        revalidated = self.h.get("/alice/dev/+simple/count-pkg/",
                                 {b"Accept": [PIP_ACCEPT], b"If-None-Match": [etag.encode()]})
        self.assertEqual(revalidated.code, 304)
        meta = self.h.get(self.url, {b"Accept": [b"application/json"]}).json["result"]
        self.assertNotIn("count", meta)
        self.assertNotIn("last", meta)

    def test_notExported(self) -> None:
        """Download records are no part of an export (its files and their entries are the same)."""
        from devpi_twisted.admin.exporter import planExport

        before = self.h.settle(self.h.storage.read(planExport))
        self.h.get(self.url)
        self.successResultOf(self.downloads.flushNow())
        self.assertIsNotNone(self.stored())
        self.assertEqual(self.h.settle(self.h.storage.read(planExport)), before)


class MirrorDownloadTests(SynchronousTestCase):
    """Files of a mirror: the first GET (fetched from upstream) and later ones count."""

    def setUp(self) -> None:
        self.h = MirrorHarness(self)
        self.filename, self.data, _ = self.h.addWheel("Mirrored", "1.0")

    def test_counted(self) -> None:
        url = self.h.mirrorFileURL("mirrored", self.filename)
        self.assertEqual(self.h.get(url).body, self.data)
        self.assertEqual(self.h.get(url).body, self.data)
        self.assertEqual(self.h.head(url).code, 200)
        self.assertEqual(self.h.get(url).body, self.data)
        self.assertEqual(self.h.fileRequests(), [f"/files/{self.filename}"])
        self.successResultOf(self.h.server.downloads.flushNow())
        self.assertEqual(record(self.h.storage, "root", "pypi", "mirrored", self.filename)["count"], 3)
