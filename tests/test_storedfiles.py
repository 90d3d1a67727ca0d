"""
Stored files answered before routing: the second GET of a file path skips
routing and the database, and answers exactly as the routed way does; any
change to files, indexes or users sends the next request the routed way.
"""

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from devpi_twisted.model import keys

from .distbuilder import buildWheel
from .releaseharness import ServerHarness


class KnownFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ServerHarness(self)
        self.h.createIndex("alice", "dev")
        self.wheel = buildWheel("known-pkg", "1.0")
        self.h.mustUpload("alice/dev", self.wheel)
        self.url = self.h.fileURL("alice/dev", "known-pkg", self.wheel.filename)
        self.reads: list[Any] = []
        real = self.h.storage.read

        def counting(function: Any) -> Any:
            self.reads.append(function)
            return real(function)

        self.patch(self.h.storage, "read", counting)

    def get(self, headers: Any = None, method: str = "GET") -> Any:
        del self.reads[:]
        return self.h.request(method, self.url, headers)

    def test_secondGetSkipsTheDatabase(self) -> None:
        first = self.get()
        self.assertEqual((first.code, first.body), (200, self.wheel.data))
        self.assertGreater(len(self.reads), 0)
        second = self.get()
        self.assertEqual(self.reads, [])
        self.assertEqual((second.code, second.body), (200, self.wheel.data))
        for header in ("ETag", "Content-Length", "Content-Type", "Cache-Control", "X-Devpi-Serial",
                       "X-Devpi-Uuid", "Last-Modified"):
            self.assertEqual(second.header(header), first.header(header), header)

    def test_conditionalHeadAndRangeAnswers(self) -> None:
        etag = self.get().header("ETag")
        self.assertEqual(self.get({b"If-None-Match": [etag.encode()]}).code, 304)
        ranged = self.get({b"Range": [b"bytes=0-9"]})
        self.assertEqual((ranged.code, ranged.body), (206, self.wheel.data[:10]))
        head = self.get(method="HEAD")
        self.assertEqual((head.code, head.body), (200, b""))
        self.assertEqual(head.header("Content-Length"), str(len(self.wheel.data)))
        self.assertEqual(self.reads, [])

    def test_jsonTakesTheRoutes(self) -> None:
        self.get()
        answer = self.get({b"Accept": [b"application/json"]})
        self.assertEqual(answer.json["type"], "releasefilemeta")
        self.assertGreater(len(self.reads), 0)

    def test_deletedFileIsGone(self) -> None:
        """A deletion is seen at once: 410, not the remembered file."""
        self.get()
        answer = self.h.request("DELETE", "/alice/dev/known-pkg/1.0", self.h.alice)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertEqual(self.get().code, 410)

    def test_anyFileChangeForgets(self) -> None:
        """A change to any file (here a yank) sends the next GET the routed way, which answers it."""
        self.get()
        entryKey = keys.fileKey("alice", "dev", "known-pkg", self.wheel.filename)
        self.successResultOf(self.h.storage.write(
            lambda txn: txn.set(entryKey, dict(txn.get(entryKey), yanked=True))))
        self.assertEqual(self.get().body, self.wheel.data)
        self.assertGreater(len(self.reads), 0)

    def test_missingContentTakesTheRoutes(self) -> None:
        """A blob gone from the store: the routed way says what is missing."""
        self.get()
        del self.h.blobs.blobs[self.wheel.sha256]
        answer = self.get()
        self.assertEqual(answer.code, 404)
        self.assertIn("missing", answer.json["message"])
