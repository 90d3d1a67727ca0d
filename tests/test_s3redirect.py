"""
C{--s3-redirect}: a stored file (a private upload, or a mirror file once
cached) is answered with a 302 to a short-lived presigned URL of the blob
store, never cached; files not stored yet, C{.metadata} and JSON answers
are served as without it.  And blob readers that are not local files (a
bucket's, the memory store's) serve whole files and ranges, and feed the
code that parses or copies blobs.
"""

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.admin.exporter import writeExport
from devpi_twisted.config import BackendSettings
from devpi_twisted.interfaces import ILocalBlobReader
from devpi_twisted.storage.readers import blockingFile
from devpi_twisted.testing.memory import PresigningMemoryBlobStore

from .distbuilder import buildWheel
from .mirrorharness import MirrorHarness

JSON = {b"Accept": [b"application/json"]}


def presigning(h: MirrorHarness, redirect: bool = True) -> PresigningMemoryBlobStore:
    """Rebuild C{h}'s server over a presigning copy of its blob store, with C{--s3-redirect} as given."""
    blobs = PresigningMemoryBlobStore()
    blobs.blobs.update(h.blobs.blobs)
    blobs.storedAt.update(h.blobs.storedAt)
    h.blobs = blobs
    h.build(None, offlineMode=False, requestTimeout=h.timeout,
            backend=replace(h.config.backend, s3Redirect=redirect))
    return blobs


class RedirectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = MirrorHarness(self)
        self.h.createIndex("alice", "dev", bases=["root/pypi"])
        self.wheel = buildWheel("priv-pkg", "1.0")
        self.h.mustUpload("alice/dev", self.wheel)
        self.url = self.h.fileURL("alice/dev", "priv-pkg", self.wheel.filename)
        self.blobs = presigning(self.h)
        self.opened: list[str] = []
        real = self.blobs.open
        self.patch(self.blobs, "open", lambda sha256: (self.opened.append(sha256), real(sha256))[1])

    def assertRedirected(self, answer: Any, sha256: str, filename: str) -> None:
        self.assertEqual(answer.code, 302, answer.body)
        self.assertEqual(answer.header("Location"),
                         f"{PresigningMemoryBlobStore.base}{sha256}?filename={filename}&expires=300&signature=fake")
        self.assertEqual(answer.header("Cache-Control"), "no-store")
        self.assertIsNone(answer.header("ETag"))
        self.assertEqual(answer.body, b"")
        self.assertEqual(self.blobs.signed[-1], (sha256, filename, "application/zip", 300))

    def test_privateFile(self) -> None:
        for _ in range(2):  # routed, then answered before routing
            self.assertRedirected(self.h.get(self.url), self.wheel.sha256, self.wheel.filename)
        self.assertEqual(len(self.blobs.signed), 2)
        self.assertEqual(self.opened, [])  # the bucket serves the bytes, not us

    def test_headAndRange(self) -> None:
        self.assertRedirected(self.h.head(self.url), self.wheel.sha256, self.wheel.filename)
        answer = self.h.get(self.url, {b"Range": [b"bytes=0-9"]})
        self.assertRedirected(answer, self.wheel.sha256, self.wheel.filename)
        self.assertIsNone(answer.header("Content-Range"))

    def test_metadataAndJSONAsToday(self) -> None:
        answer = self.h.get(self.url + ".metadata")
        self.assertEqual((answer.code, answer.body), (200, self.wheel.metadata))
        answer = self.h.get(self.url, JSON)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json["result"]["hashes"]["sha256"], self.wheel.sha256)
        self.assertEqual(self.blobs.signed, [])

    def test_missingFileIsNotFound(self) -> None:
        answer = self.h.get(self.url.replace("priv_pkg-1.0", "priv_pkg-9.0"))
        self.assertEqual(answer.code, 404)
        self.assertEqual(self.blobs.signed, [])

    def test_mirrorFileStreamedUntilStoredThenRedirected(self) -> None:
        filename, data, _ = self.h.addWheel("mirrored", "2.0")
        url = self.h.mirrorFileURL("mirrored", filename)
        answer = self.h.get(url)
        self.assertEqual((answer.code, answer.body), (200, data))  # live from upstream
        self.assertEqual(self.blobs.signed, [])
        entry = self.h.storedEntry("mirrored", filename)
        self.assertRedirected(self.h.get(url), entry["sha256"], filename)
        self.assertRedirected(self.h.get(url), entry["sha256"], filename)


class NoRedirectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = MirrorHarness(self)
        self.h.createIndex("alice", "dev")
        self.wheel = buildWheel("priv-pkg", "1.0")
        self.h.mustUpload("alice/dev", self.wheel)
        self.url = self.h.fileURL("alice/dev", "priv-pkg", self.wheel.filename)

    def test_optionOffStreams(self) -> None:
        blobs = presigning(self.h, redirect=False)
        answer = self.h.get(self.url)
        self.assertEqual((answer.code, answer.body), (200, self.wheel.data))
        self.assertEqual(blobs.signed, [])

    def test_storeThatCannotSignStreams(self) -> None:
        self.h.build(None, offlineMode=False, requestTimeout=self.h.timeout,
                     backend=BackendSettings(s3Redirect=True))
        answer = self.h.get(self.url)
        self.assertEqual((answer.code, answer.body), (200, self.wheel.data))


class NonLocalReaderTests(SynchronousTestCase):
    """The memory store's readers are not local files, as a bucket's are not."""

    def setUp(self) -> None:
        self.h = MirrorHarness(self)
        self.h.createIndex("alice", "dev")
        self.wheel = buildWheel("priv-pkg", "1.0")
        self.h.mustUpload("alice/dev", self.wheel)
        self.url = self.h.fileURL("alice/dev", "priv-pkg", self.wheel.filename)
        reader = self.successResultOf(self.h.blobs.open(self.wheel.sha256))
        self.assertFalse(ILocalBlobReader.providedBy(reader))
        self.assertFalse(hasattr(reader, "fileno"))

    def test_fullAndRangeDownloads(self) -> None:
        for _ in range(2):  # routed, then answered before routing
            answer = self.h.get(self.url)
            self.assertEqual((answer.code, answer.body), (200, self.wheel.data))
            answer = self.h.get(self.url, {b"Range": [b"bytes=10-99"]})
            self.assertEqual((answer.code, answer.body), (206, self.wheel.data[10:100]))
            self.assertEqual(answer.header("Content-Range"), f"bytes 10-99/{len(self.wheel.data)}")
            answer = self.h.get(self.url, {b"Range": [b"bytes=-5"]})
            self.assertEqual((answer.code, answer.body), (206, self.wheel.data[-5:]))

    def test_fullDownloadOverAConnection(self) -> None:
        """Through the site over a TCP-like transport, where a local blob would go by sendfile."""
        path = self.url.split("devpi.test", 1)[1].encode("ascii")
        answer = self.h.raw(b"GET " + path + b" HTTP/1.1\r\nHost: devpi.test\r\nConnection: close\r\n\r\n")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, self.wheel.data)

    def test_blockingFileCopies(self) -> None:
        reader = self.successResultOf(self.h.blobs.open(self.wheel.sha256))
        reader.seek(7)  # a copy has the whole content, wherever the reader was
        file = self.successResultOf(Deferred.fromCoroutine(blockingFile(reader, maybeDeferred)))
        with file:
            self.assertEqual(file.read(), self.wheel.data)
        self.assertTrue(reader.closed)

    def test_export(self) -> None:
        target = FilePath(self.mktemp())
        summary = self.successResultOf(Deferred.fromCoroutine(writeExport(self.h.storage, self.h.blobs, target)))
        self.assertEqual(summary.indexes["alice/dev"], (1, 1))
        exported = [p for p in target.walk() if p.basename() == self.wheel.filename]
        self.assertEqual([p.getContent() for p in exported], [self.wheel.data])

